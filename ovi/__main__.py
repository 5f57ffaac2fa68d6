"""Command line: ``python -m ovi generate | info | download | convert``.

    python -m ovi generate --models ckpts --variant 960x960_10s --prompt "..." --out clip.mp4
    python -m ovi generate --models ckpts --fusion model_960x960_10s_q8_0.gguf --prompt "..." --out clip.mp4
    python -m ovi info ckpts/Ovi/model_960x960_10s.safetensors
    python -m ovi download --variant 960x960_10s --dest ckpts
    python -m ovi convert --to fp8 ckpts/Ovi/model_960x960_10s.safetensors model_960x960_10s_fp8.safetensors

Ctrl-C, SIGTERM or SIGHUP during ``generate`` stops after the current step (a second one aborts at once); during
``convert`` it stops at once. The exit status is then 130 and no output file is written, nor any temporary file
(``ovi.atomic_write``). A run killed outright (SIGKILL, a power cut) can leave a temporary
``.<name>.ovi-<pid>-<hex>.partial`` beside its output; the next run writing to that folder removes it and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .atomic_write import sweep_stale
from .choices import AUDIO_NEGATIVE_PROMPT as AUDIO_NEGATIVE
from .choices import VIDEO_NEGATIVE_PROMPT as VIDEO_NEGATIVE
from .log import log

EXIT_INTERRUPTED = 130


class _Bar:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.last_decile = -1
        self.done = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = f"{elapsed / done:.2f} s/it" if done else ""
        width = 30
        fill = int(width * done / max(total, 1))
        line = f"{self.label} {done}/{total} [{'#' * fill}{'.' * (width - fill)}] {elapsed:.1f} s {rate}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            decile = int(10 * done / max(total, 1))
            if decile == self.last_decile and done < total:
                return
            self.last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done = done >= total


# Stop requests: Ctrl-C, a service manager's or `kill`'s SIGTERM, and SIGHUP (the terminal closed) alike.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _StopFlag:
    """Handler of the stop signals: the first asks the engine to stop at the next check, the second aborts at
    once (KeyboardInterrupt). ``immediate``: the first aborts at once (commands with no step to finish)."""

    def __init__(self, immediate: bool = False):
        self.event = threading.Event()
        self.immediate = immediate
        self.previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.event.is_set()

    def _handler(self, signum, frame) -> None:
        if self.event.is_set() or self.immediate:
            self.event.set()
            raise KeyboardInterrupt
        self.event.set()
        try:
            sys.stderr.write("\n")
            log.warning("%s: stopping after the current step (again to abort at once)", signal.Signals(signum).name)
        except (OSError, ValueError):
            pass  # SIGHUP: the terminal may be gone; stopping matters, not the message

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous.clear()


class _OneOrTwo(argparse.Action):
    """argparse has no "1 or 2 values" count: take "+" and refuse a third."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            parser.error(f"{option_string} takes one file or a video + audio pair, got {len(values)} paths")
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    from .attention import BACKENDS
    from .engine import MEMORY_MODES
    from .sampling.schedules import SOLVERS
    from .variants import VARIANTS

    p = argparse.ArgumentParser(prog="python -m ovi", description="Ovi audio-video generation.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,info,download,convert}")

    g = sub.add_parser("generate", help="generate an mp4 from a prompt (and optionally a first image)",
                       description="Generate a video with sound. --size is used exactly (multiples of 32); "
                                   "--aspect is rescaled to the variant's area as the official code does.")
    g.add_argument("--models", required=True, type=Path, help="folder with Ovi/, Wan2.2-TI2V-5B/, MMAudio/")
    g.add_argument("--prompt", required=True, help="the description; speech in <S>...<E>, sound after 'Audio:'")
    g.add_argument("--image", type=Path, help="first frame (I2AV)")
    g.add_argument("--variant", choices=list(VARIANTS), help="needed when the folder holds several models")
    g.add_argument("--fusion", nargs="+", type=Path, action=_OneOrTwo, metavar="PATH",
                   help="fusion model file (bf16, FP8 or GGUF), or a split video + audio pair, used instead of the "
                        "Ovi/ lookup; its variant comes from its metadata or name")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=100)
    g.add_argument("--solver", choices=list(SOLVERS) + ["dpmpp"], default="unipc")
    g.add_argument("--shift", type=float, default=5.0)
    g.add_argument("--size", metavar="HxW", help="exact frame size, both sides multiples of 32")
    g.add_argument("--aspect", metavar="H:W", help="aspect ratio at the variant's area (official snapping)")
    g.add_argument("--video-guidance", type=float, default=4.0)
    g.add_argument("--audio-guidance", type=float, default=3.0)
    g.add_argument("--slg-layer", type=int, default=11, help="fused layer skipped in the negative pass (<= 0: none)")
    g.add_argument("--video-negative-prompt", default=VIDEO_NEGATIVE)
    g.add_argument("--audio-negative-prompt", default=AUDIO_NEGATIVE)
    g.add_argument("--memory-mode", choices=MEMORY_MODES, default="auto")
    g.add_argument("--block-swap", type=int, default=0, metavar="N", help="fused layers kept resident (block_swap)")
    g.add_argument("--attention", choices=BACKENDS, default="auto")
    g.add_argument("--tile-size", type=int, default=None, metavar="N", help="VAE decode tile, latent pixels (0: off)")
    g.add_argument("--tile-overlap", type=int, default=None, metavar="N")
    g.add_argument("--vae-dtype", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--device", default=None, help="e.g. cuda:1 or cpu (default: the accelerator if any)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="fusion + text compute dtype")
    g.add_argument("--out", required=True, type=Path, help="output .mp4")

    i = sub.add_parser("info", help="what a checkpoint file is: component, variant, format, dtype, size, tensors")
    i.add_argument("files", nargs="+", type=Path)

    sub.add_parser("download", help="fetch the files a variant needs (see `python -m ovi download --help`)",
                   add_help=False)
    sub.add_parser("convert", help="fusion checkpoint to FP8 or GGUF (see `python -m ovi convert --help`)",
                   add_help=False)
    return p


def _info(files: list[Path]) -> int:
    from .detect import format_info, inspect_file
    from .loading import CheckpointError

    rc = 0
    for n, f in enumerate(files):
        try:
            text = format_info(inspect_file(f))
        except (CheckpointError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
            continue
        print(("\n" if n else "") + text)
    return rc


def _generate(a: argparse.Namespace, stop: _StopFlag) -> int:
    from .engine import OviEngine, parse_dtype
    from .sampling.loop import Interrupted

    if a.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must name an .mp4 file, got {a.out}")
    if not a.out.parent.is_dir():
        raise ValueError(f"the output folder {a.out.parent} does not exist")
    sweep_stale(a.out.parent)  # temporary files of killed earlier runs (logged); the mp4 writer would, too, but late
    engine = OviEngine.from_dir(a.models, fusion=a.fusion, variant=a.variant, device=a.device,
                                dtype=parse_dtype(a.dtype), memory_mode=a.memory_mode, block_swap=a.block_swap,
                                attention=a.attention, vae_dtype=a.vae_dtype, tile_size=a.tile_size,
                                tile_overlap=a.tile_overlap)
    if stop():
        raise Interrupted(0, a.steps)
    result = engine.generate(
        a.prompt, image=a.image, video_negative_prompt=a.video_negative_prompt,
        audio_negative_prompt=a.audio_negative_prompt, size=a.size, aspect=a.aspect, seed=a.seed, steps=a.steps,
        solver=a.solver, shift=a.shift, video_guidance=a.video_guidance, audio_guidance=a.audio_guidance,
        slg_layer=a.slg_layer, progress=_Bar("[Ovi] diffusion"), should_stop=stop)
    clip = engine.decode(result, progress=_Bar("[Ovi] video decode"), should_stop=stop)
    if stop():
        raise Interrupted(a.steps, a.steps)

    def on_write(done: int, total: int) -> None:
        if stop():  # aborts the write; video_io leaves nothing behind
            raise KeyboardInterrupt

    engine.save_mp4(clip, a.out, progress=on_write)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = [x for x in argv if not x.startswith("-")][:1]
    if head == ["download"]:
        # the download command owns its own options
        k = argv.index("download")
        from .download import main_download

        with _logging("-v" in argv[:k] or "--verbose" in argv[:k], "-q" in argv[:k] or "--quiet" in argv[:k]):
            return int(main_download(argv[k + 1:]) or 0)
    if head == ["convert"]:
        k = argv.index("convert")
        from .convert import main_convert

        with _logging("-v" in argv[:k] or "--verbose" in argv[:k], "-q" in argv[:k] or "--quiet" in argv[:k]):
            with _StopFlag(immediate=True):
                try:
                    return int(main_convert(argv[k + 1:]) or 0)
                except KeyboardInterrupt:
                    sys.stderr.write("\n")
                    log.warning("interrupted; no file written")
                    return EXIT_INTERRUPTED
    a = _parser().parse_args(argv)
    with _logging(a.verbose, a.quiet):
        if a.command == "info":
            return _info(a.files)
        from .sampling.loop import Interrupted

        with _StopFlag() as stop:
            try:
                return _generate(a, stop)
            except (Interrupted, KeyboardInterrupt):
                sys.stderr.write("\n")
                log.warning("interrupted; no video written")
                return EXIT_INTERRUPTED
            except (ValueError, FileNotFoundError, TypeError, RuntimeError, OSError) as e:
                log.debug("generate failed", exc_info=True)
                print(f"error: {e}", file=sys.stderr)  # a full disk: "cannot write clip.mp4 into ...: No space ..."
                return 2 if isinstance(e, (ValueError, FileNotFoundError, TypeError)) else 1


@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool):
    """Engine log lines on stderr for the duration of one command (the logger is left as it was)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
