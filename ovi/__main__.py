"""Command line: ``python -m ovi generate | info | download | convert``.

    python -m ovi generate --models ckpts --variant 960x960_10s --prompt "..." --out clip.mp4
    python -m ovi generate --models ckpts --fusion model_960x960_10s_q8_0.gguf --prompt "..." --out clip.mp4
    python -m ovi generate --models ckpts --variant 960x960_5s --duration 17 --prompt "..." --prompt "..." \
        --prompt "..." --prompt "..." --out long.mp4             # a long clip: 4 windows, one prompt each
    python -m ovi generate --models ckpts --audio voice.wav --image face.png --prompt "..." --out talk.mp4
    python -m ovi generate --models ckpts --video silent.mp4 --prompt "Audio: rain on a tin roof" --out sound.mp4
    python -m ovi generate --models ckpts --lora Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors:1:0 \
        --steps 6 --shift 6 --video-guidance 1 --audio-guidance 1 --prompt "..." --out fast.mp4   # FastWan preset
    python -m ovi info ckpts/Ovi/model_960x960_10s.safetensors
    python -m ovi info Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors     # a LoRA: convention, rank, branch
    python -m ovi download --variant 960x960_10s --dest ckpts
    python -m ovi convert --to fp8 ckpts/Ovi/model_960x960_10s.safetensors model_960x960_10s_fp8.safetensors

Long clips (``ovi.long_clip``): ``--duration`` seconds, or one window per ``--prompt`` when several are given and
no duration, in windows of the variant's length that share ``--overlap`` seconds (default 1) of picture and sound.
``--audio FILE`` (lip-sync) holds the file's sound as known audio in every window, the clip as long as the track
unless ``--duration`` says otherwise; ``--video FILE`` (soundtrack) holds the file's frames (24 fps, resized to
``--size`` or the variant's area) as known video and generates the sound. ``--window-latents DIR`` saves each
finished window there, and a rerun with the same settings loads them instead of generating them again.

Ctrl-C, SIGTERM or SIGHUP during ``generate`` stops after the current step (a second one aborts at once); during
``convert`` it stops at once. The exit status is then 130 and no output file is written, nor any temporary file
(``ovi.atomic_write``), except that a long clip keeps the windows already finished: they are written as a valid,
shorter mp4. A run killed outright (SIGKILL, a power cut) can leave a temporary
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


class _ClipBar:
    """Progress of a long clip: a _Bar per window, labelled with the window (``window 2/4 diffusion 13/50``)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.window: int | None = None
        self.bar: _Bar | None = None

    def __call__(self, window: int, windows: int, step: int, steps: int) -> None:
        if window != self.window or self.bar is None:
            self.window = window
            self.bar = _Bar(f"[Ovi] window {window}/{windows} diffusion", self.stream)
        self.bar(step, steps)


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
    from .long_clip.plan import DEFAULT_OVERLAP_S
    from .sampling.known import KNOWN_MODES
    from .sampling.schedules import SOLVERS
    from .variants import VARIANTS

    p = argparse.ArgumentParser(prog="python -m ovi", description="Ovi audio-video generation.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,info,download,convert}")

    g = sub.add_parser("generate", help="generate an mp4 from a prompt (and optionally a first image, a voice "
                                        "track or a silent video), one window or a long clip",
                       description="Generate a video with sound. --size is used exactly (multiples of 32); "
                                   "--aspect is rescaled to the variant's area as the official code does. "
                                   "--duration, several --prompt, --audio or --video make a long clip of "
                                   "overlapping windows, written window by window; an interrupt keeps the "
                                   "finished windows.")
    g.add_argument("--models", required=True, type=Path, help="folder with Ovi/, Wan2.2-TI2V-5B/, MMAudio/")
    g.add_argument("--prompt", required=True, action="append",
                   help="the description; speech in <S>...<E>, sound after 'Audio:'. Repeat it for a long clip's "
                        "windows, one each (a storyboard); one prompt serves every window")
    g.add_argument("--image", type=Path, help="first frame (I2AV)")
    g.add_argument("--duration", type=float, metavar="SECONDS",
                   help="length of the clip; longer than one window makes a long clip of overlapping windows "
                        "(default: one window, or one window per --prompt, or the --audio / --video length)")
    g.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP_S, metavar="SECONDS",
                   help="seconds each window shares with the one before, picture and sound (default %(default)s; "
                        "0: the last frame only)")
    g.add_argument("--audio", type=Path, metavar="FILE",
                   help="lip-sync: the clip's sound is this file's (wav, flac, mp3, ...; resampled to 16 kHz mono), "
                        "held as known audio in every window; the clip lasts as long as the file unless --duration")
    g.add_argument("--video", type=Path, metavar="FILE",
                   help="soundtrack: the clip's frames are this video's (at 24 fps, resized to --size or the "
                        "variant's area), held as known video; the model makes the sound")
    g.add_argument("--video-mode", choices=KNOWN_MODES, default=None,
                   help="how known video (overlaps, --video) is held: clean (written back, t = 0; the default, "
                        "as the model was trained for the first frame) or renoise (noised to each step's level)")
    g.add_argument("--audio-mode", choices=KNOWN_MODES, default=None,
                   help="how known audio (overlaps, --audio) is held: renoise (the default: the audio branch "
                        "never saw per-token timesteps) or clean")
    g.add_argument("--window-latents", type=Path, metavar="DIR",
                   help="save each finished window's latents in DIR; a rerun with the same settings resumes "
                        "from the windows found there")
    g.add_argument("--variant", choices=list(VARIANTS), help="needed when the folder holds several models")
    g.add_argument("--fusion", nargs="+", type=Path, action=_OneOrTwo, metavar="PATH",
                   help="fusion model file (bf16, FP8 or GGUF), or a split video + audio pair, used instead of the "
                        "Ovi/ lookup; its variant comes from its metadata or name")
    g.add_argument("--lora", type=_lora_arg, action="append", default=[], metavar="FILE[:SV[:SA]]",
                   help="a LoRA applied to the fusion model, at video strength SV (default 1) and audio strength SA "
                        "(default SV); repeat for several, applied in order. A Wan 2.2 5B LoRA acts on the video "
                        "branch only, an Ovi LoRA (video_model./audio_model. keys) on both")
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
    g.add_argument("--cache", type=float, default=0.0, metavar="THRESHOLD",
                   help="step cache: reuse the last full step while the estimated output change stays below "
                        "THRESHOLD (e.g. 0.05-0.1; 0: off, every step runs the model)")
    g.add_argument("--compile", action="store_true", help="torch.compile the fused layer (compiled at the first "
                                                          "step; needs a C++ compiler on the CPU, Triton on a GPU)")
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


def _lora_arg(value: str) -> tuple[Path, float, float]:
    """``FILE[:SV[:SA]]`` -> (file, video strength, audio strength). Only trailing numbers are strengths, so a path
    with colons of its own (``C:\\loras\\x.safetensors``) stays whole."""
    parts = value.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give the LoRA file, then optional :video[:audio] strengths")
    video = numbers[0] if numbers else 1.0
    return Path(path), video, numbers[1] if len(numbers) > 1 else video


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
                                tile_overlap=a.tile_overlap, compile=a.compile)
    if a.lora:
        engine.set_loras([(path, (video, audio)) for path, video, audio in a.lora])
    if stop():
        raise Interrupted(0, a.steps)
    if _is_long_clip(a):
        return _generate_clip(a, engine, stop)
    result = engine.generate(
        a.prompt[0], image=a.image, video_negative_prompt=a.video_negative_prompt,
        audio_negative_prompt=a.audio_negative_prompt, size=a.size, aspect=a.aspect, seed=a.seed, steps=a.steps,
        solver=a.solver, shift=a.shift, video_guidance=a.video_guidance, audio_guidance=a.audio_guidance,
        slg_layer=a.slg_layer, progress=_Bar("[Ovi] diffusion"), should_stop=stop, cache_threshold=a.cache)
    _log_passes(result.timings)
    clip = engine.decode(result, progress=_Bar("[Ovi] video decode"), should_stop=stop)
    if stop():
        raise Interrupted(a.steps, a.steps)

    def on_write(done: int, total: int) -> None:
        if stop():  # aborts the write; video_io leaves nothing behind
            raise KeyboardInterrupt

    engine.save_mp4(clip, a.out, progress=on_write)
    return 0


def _log_passes(timings: dict) -> None:
    """What the diffusion cost in model passes (and compiles), against the default loop's two per step."""
    line = f"diffusion: {timings['passes_run']} model passes run, {timings['passes_skipped']} skipped"
    if timings.get("cached_steps"):
        line += f" ({timings['cached_steps']} steps from the step cache)"
    if "layer_compiles" in timings:
        line += (f"; torch.compile: {timings['layer_compiles']} compile(s), {timings['layer_recompiles']} "
                 f"recompile(s), {timings['layer_compile_seconds']:.1f} s")
    log.info("%s; %.1f s", line, timings.get("diffusion", 0.0))


def _is_long_clip(a: argparse.Namespace) -> bool:
    """Anything beyond one window's prompt goes through ovi.long_clip; one prompt alone is the one-window path."""
    return len(a.prompt) > 1 or any(x is not None for x in (a.duration, a.audio, a.video, a.window_latents))


def _check_clip_arguments(a: argparse.Namespace) -> None:
    if a.audio is not None and a.video is not None:
        raise ValueError("give --audio (lip-sync) or --video (soundtrack), not both: with both known there is "
                         "nothing to generate")
    if a.video is not None and a.image is not None:
        raise ValueError("--video gives every frame; --image (the first frame) has no place in a soundtrack")
    if a.video is not None and a.aspect is not None:
        raise ValueError("--video keeps its own aspect; give --size HxW to choose the frame size exactly")


def _generate_clip(a: argparse.Namespace, engine, stop: _StopFlag) -> int:
    """A long clip (or a lip-sync / soundtrack clip) through ovi.long_clip.generate_clip, window by window."""
    from . import media
    from .long_clip.generate import generate_clip
    from .long_clip.plan import plan_clip

    _check_clip_arguments(a)
    v = engine.variant
    track = frames = None
    kw = dict(video_negative_prompt=a.video_negative_prompt, audio_negative_prompt=a.audio_negative_prompt,
              steps=a.steps, solver=a.solver, shift=a.shift, video_guidance=a.video_guidance,
              audio_guidance=a.audio_guidance, slg_layer=a.slg_layer, cache_threshold=a.cache)
    if a.audio is not None:
        track = media.load_audio(a.audio)
        plan = media.plan_for_audio(v, track, duration=a.duration, overlap=a.overlap, seed=a.seed)
        track = media.fit_audio_to_plan(track, plan)
    elif a.video is not None:
        # with a duration, no more frames are read than the windows cover
        limit = None if a.duration is None else plan_clip(v, duration=a.duration, overlap=a.overlap).span_frames
        frames, _ = media.load_video(a.video, size=a.size, variant=v, resize=True, max_frames=limit)
        plan = media.plan_for_frames(v, frames, duration=a.duration, overlap=a.overlap, seed=a.seed)
        frames = media.fit_frames_to_plan(frames, plan)
    else:
        plan = plan_clip(v, windows=len(a.prompt) if a.duration is None else None, duration=a.duration,
                         overlap=a.overlap, seed=a.seed)
    kw.update({k: x for k, x in (("size", a.size), ("aspect", a.aspect)) if x is not None and a.video is None})
    if len(a.prompt) not in (1, plan.count):
        raise ValueError(f"{len(a.prompt)} prompts for a clip of {plan.count} windows ({plan.seconds:.2f} s): give "
                         "one --prompt per window, or one for all")
    before = a.out.stat().st_mtime_ns if a.out.exists() else None
    try:
        result = generate_clip(engine, a.prompt, a.out, plan=plan, image=a.image, audio_track=track,
                               video_frames=frames, video_mode=a.video_mode, audio_mode=a.audio_mode,
                               window_latents=a.window_latents, progress=_ClipBar(), should_stop=stop,
                               tile_size=a.tile_size, **kw)
    except KeyboardInterrupt:
        # aborted at once (a second stop signal): generate_clip wrote the finished windows, if any, and said so
        if a.out.exists() and a.out.stat().st_mtime_ns != before:
            sys.stderr.write("\n")
            log.warning("interrupted; kept the finished windows in %s", a.out)
            return EXIT_INTERRUPTED
        raise
    if result.interrupted:
        sys.stderr.write("\n")
        log.warning("interrupted; kept the %d finished window%s of %d in %s", result.windows_done,
                    "s" if result.windows_done > 1 else "", plan.count, result.path)
        return EXIT_INTERRUPTED
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
