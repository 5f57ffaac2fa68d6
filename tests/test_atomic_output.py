"""No half-written output, whatever stops the process: SIGINT/SIGTERM/SIGHUP, SIGKILL (then the sweep of the next
run), a full disk and a read-only folder, for the mp4 writer, the latent saver and `python -m ovi convert`."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import ovi.atomic_write as atomic_write
from ovi.__main__ import EXIT_INTERRUPTED, _StopFlag, main
from ovi.atomic_write import TEMP_NAME, AtomicOutput, is_stale, sweep_stale, temp_path
from ovi.video_io import write_mp4

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A woman says <S>hello there<E> on a busy street. Audio: traffic and footsteps"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
WAIT_S = 300  # generous bound for a child on a loaded 2-core machine to reach its write phase

# Runs `python -m ovi generate ...` with the mp4 write held at frame 5 until a stop signal has been handled (or,
# for SIGKILL, forever): the test signals only after "WRITING" is printed, so it always hits the write phase.
HELD_GENERATE = """
import sys, time
import ovi.__main__ as m, ovi.video_io as v
flags = []
enter = m._StopFlag.__enter__
def remember(self):
    flags.append(self)
    return enter(self)
m._StopFlag.__enter__ = remember
frame = v._frame_u8
def held(frames, i):
    if i == 5:
        print("WRITING", flush=True)
        deadline = time.monotonic() + 600
        while not flags[0]() and time.monotonic() < deadline:
            time.sleep(0.01)
    return frame(frames, i)
v._frame_u8 = held
sys.exit(m.main(sys.argv[1:]))
"""

# Runs `python -m ovi convert ...` with the StreamingWriter held after its third tensor.
HELD_CONVERT = """
import sys, time
import ovi.__main__ as m, ovi.safetensors_stream as s
write = s.StreamingWriter.write
def held(self, name, tensor):
    write(self, name, tensor)
    if self._next == 3:
        print("WRITING", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.01)
s.StreamingWriter.write = held
sys.exit(m.main(sys.argv[1:]))
"""


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_NAME.match(p.name))


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), so a test can wait for ffmpeg after killing its parent."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _start_held(script: str, args: list[str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + WAIT_S
    for line in proc.stdout:  # wait for the write phase (the line printed by the held writer)
        lines.append(line)
        if line.strip() == "WRITING" or time.monotonic() > deadline:
            break
    assert lines and lines[-1].strip() == "WRITING", "".join(lines)
    return proc, lines


def _finish(proc: subprocess.Popen, lines: list[str]) -> str:
    try:
        rest, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + (rest or "")


def _generate_args(models: Path, out: Path, steps: int = 1) -> list[str]:
    return ["generate", "--models", str(models), "--variant", "720x720_5s", "--prompt", PROMPT, "--steps",
            str(steps), "--size", "64x64", "--slg-layer", "1", "--out", str(out)]


# -- the naming rule and the sweep --------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _age(path: Path, seconds: float = 3600) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_temporary_names_follow_one_pattern(tmp_path):
    t = temp_path(tmp_path / "clip.mp4")
    m = TEMP_NAME.match(t.name)
    assert t.parent == tmp_path and t.name.startswith(".clip.mp4.ovi-") and t.name.endswith(".partial")
    assert m and m["target"] == "clip.mp4" and int(m["pid"]) == os.getpid()
    assert temp_path(tmp_path / "clip.mp4") != t  # two writes of one target never share a temporary file


def test_sweep_removes_only_stale_files_of_ours(tmp_path, caplog):
    dead = _dead_pid()
    stale = tmp_path / f".clip.mp4.ovi-{dead}-0123abcd.partial"
    stale.write_bytes(b"x")
    _age(stale)
    reused = tmp_path / f".a.gguf.ovi-{os.getpid()}-00000000.partial"  # this pid, from before this run: reused
    reused.write_bytes(b"x")
    _age(reused)
    live = tmp_path / f".b.safetensors.ovi-{os.getppid()}-11111111.partial"  # a live process's write
    live.write_bytes(b"x")
    _age(live)
    fresh = tmp_path / f".c.mp4.ovi-{dead}-22222222.partial"  # newer than this run: maybe a run started later
    fresh.write_bytes(b"x")
    foreign = ["notes.partial", "model.safetensors.partial", ".clip.mp4.1234abcd.part",
               "Wan2.2_VAE.pth.0123456789abcdef.incomplete", f".d.mp4.ovi-{dead}-xyz.partial"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"keep")
        _age(tmp_path / name)
    (tmp_path / "sub").mkdir()
    below = tmp_path / "sub" / f".e.mp4.ovi-{dead}-33333333.partial"
    below.write_bytes(b"x")
    _age(below)
    with caplog.at_level("INFO", logger="ovi"):
        removed = sweep_stale(tmp_path, started=time.time() - 60)
    assert sorted(removed) == sorted([stale, reused])
    assert not stale.exists() and not reused.exists()
    assert live.exists() and fresh.exists() and below.exists()
    assert all((tmp_path / n).read_bytes() == b"keep" for n in foreign)
    assert str(stale) in caplog.text and "interrupted earlier run" in caplog.text
    assert is_stale(live, started=time.time()) is False and is_stale(tmp_path / "notes.partial") is False


class _Interrupt(BaseException):
    """Like ComfyUI's InterruptProcessingException: a BaseException, not an Exception."""


@pytest.mark.parametrize("stop", [KeyboardInterrupt, _Interrupt, RuntimeError])
def test_atomic_output_leaves_nothing_when_stopped(tmp_path, stop):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(stop):
        with AtomicOutput(target) as out:
            out.write(b"new data")
            assert _temps(tmp_path) == [out.tmp.name]
            raise stop()
    assert target.read_bytes() == b"previous" and _temps(tmp_path) == []
    with AtomicOutput(target) as out:
        out.write(b"new data")
    assert target.read_bytes() == b"new data" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_stop_signals_are_all_ctrl_c():
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        if not hasattr(signal, name):
            continue
        sig = getattr(signal, name)
        before = signal.getsignal(sig)
        with _StopFlag() as stop:
            assert not stop()
            signal.raise_signal(sig)
            assert stop()  # first: stop at the next check
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)  # second: at once
        assert signal.getsignal(sig) == before
        with _StopFlag(immediate=True), pytest.raises(KeyboardInterrupt):
            signal.raise_signal(sig)  # convert: at once


# -- ovi generate: signals at the write phase, SIGKILL then the next run ------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_generate_stopped_while_writing_leaves_nothing(tiny_dir, tmp_path, sig):
    out = tmp_path / "clip.mp4"
    proc, lines = _start_held(HELD_GENERATE, _generate_args(tiny_dir, out), tmp_path)
    assert len(_temps(tmp_path)) == 1  # the write had begun: its temporary file is there
    proc.send_signal(sig)
    text = _finish(proc, lines)
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "interrupted; no video written" in text
    assert os.listdir(tmp_path) == []  # no mp4, no temporary file


def test_generate_killed_while_writing_is_swept_by_the_next_run(tiny_dir, tmp_path):
    out = tmp_path / "clip.mp4"
    foreign = {"notes.partial": b"mine", "clip.mp4.part": b"mine too", ".clip.mp4.deadbeef.part": b"and this"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    proc, lines = _start_held(HELD_GENERATE, _generate_args(tiny_dir, out), tmp_path)
    ffmpeg = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    _finish(proc, lines)
    deadline = time.monotonic() + WAIT_S
    while not all(_gone_or_zombie(p) for p in ffmpeg) and time.monotonic() < deadline:
        time.sleep(0.05)  # ffmpeg sees the end of its input and finishes its (temporary) file; wait for that
    left = _temps(tmp_path)
    assert proc.returncode == -signal.SIGKILL and len(left) == 1 and not out.exists()
    assert TEMP_NAME.match(left[0])["pid"] == str(proc.pid)

    # The next run into that folder sweeps before it loads anything, so one that then fails (no models in an empty
    # folder) shows it as well as a full run would, in a fraction of the time; convert's test below reruns in full.
    no_models = tmp_path.parent / f"{tmp_path.name}_no_models"
    no_models.mkdir()
    rerun = subprocess.run([sys.executable, "-m", "ovi", *_generate_args(no_models, out)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=WAIT_S)
    assert rerun.returncode == 2 and "missing Ovi components" in rerun.stderr, rerun.stderr
    assert f"removed {tmp_path / left[0]}, a temporary file left by an interrupted earlier run" in rerun.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(foreign)
    assert all((tmp_path / n).read_bytes() == d for n, d in foreign.items())  # not ours: untouched


# -- ovi convert: SIGTERM and SIGKILL while writing --------------------------------------------------------------


def test_convert_stopped_while_writing_leaves_nothing(tiny_dir, tmp_path):
    src = tiny_dir / "Ovi" / "model_960x960_10s.safetensors"
    dst = tmp_path / "out_fp8.safetensors"
    proc, lines = _start_held(HELD_CONVERT, ["convert", "--to", "fp8", str(src), str(dst)], tmp_path)
    assert len(_temps(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "interrupted; no file written" in text
    assert os.listdir(tmp_path) == []


def test_convert_killed_then_the_next_convert_sweeps(tiny_dir, tmp_path):
    src = tiny_dir / "Ovi" / "model_960x960_10s.safetensors"
    dst = tmp_path / "out_fp8.safetensors"
    (tmp_path / "keep.safetensors.partial").write_bytes(b"not ours")
    proc, lines = _start_held(HELD_CONVERT, ["convert", "--to", "fp8", str(src), str(dst)], tmp_path)
    proc.send_signal(signal.SIGKILL)
    _finish(proc, lines)
    left = _temps(tmp_path)
    assert proc.returncode == -signal.SIGKILL and len(left) == 1 and not dst.exists()
    rerun = subprocess.run([sys.executable, "-m", "ovi", "convert", "--to", "gguf-q8_0", str(src),
                            str(tmp_path / "out.gguf")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {tmp_path / left[0]}" in rerun.stderr
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors.partial", "out.gguf"]


# -- full and read-only filesystems ------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A real tmpfs at ``folder`` (root only); yields False where mounting is not possible here."""
    folder.mkdir(exist_ok=True)
    if os.name != "posix" or os.geteuid() != 0:
        yield False
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture(params=["ENOSPC", "EROFS"])
def broken_folder(request, tmp_path, monkeypatch):
    """A folder where writes fail: a 64 KiB tmpfs (ENOSPC) or a read-only one (EROFS), mounted for real where this
    machine allows it, else a plain folder whose writes fail with that errno (the same assertions follow)."""
    folder = tmp_path / "mnt"
    code = getattr(errno, request.param)
    with _tmpfs(folder, "size=64k") as mounted:
        if mounted and code == errno.EROFS:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        if not mounted:
            real_open = open

            def failing_open(file, mode="r", *a, **kw):
                if code == errno.EROFS and "x" in mode:
                    raise OSError(code, os.strerror(code), str(file))
                f = real_open(file, mode, *a, **kw)
                if code == errno.ENOSPC and "x" in mode:
                    def write(data, _f=f):
                        raise OSError(code, os.strerror(code))
                    f.write = write
                return f

            monkeypatch.setattr(atomic_write, "open", failing_open, raising=False)

            def failing_fsync(fd):  # writers that fill the file by name (ffmpeg, gguf) learn of it here
                raise OSError(code, os.strerror(code))

            monkeypatch.setattr(atomic_write.os, "fsync", failing_fsync)
        yield folder, request.param, mounted


def _assert_named_and_clean(message: str, final: Path, folder: Path, what: str) -> None:
    assert str(final) in message or (final.name in message and str(final.parent) in message), message
    assert os.strerror(getattr(errno, what)) in message or what == "ENOSPC" and "No space" in message, message
    assert not final.exists()
    assert _temps(folder) == [], os.listdir(folder)


def test_mp4_into_a_broken_folder(broken_folder):
    folder, what, mounted = broken_folder
    final = folder / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (48, 64, 64, 3), dtype=np.uint8)  # noise: > 64 KiB
    with pytest.raises((OSError, RuntimeError)) as e:
        write_mp4(final, frames, np.zeros(32000, np.float32))
    _assert_named_and_clean(str(e.value), final, folder, what)


def _nodes_latents(monkeypatch, output: Path):
    """nodes/latents.py imported as ComfyUI imports the pack (a package), with a minimal ``folder_paths``."""
    pack = types.ModuleType("ovi_pack_under_test")
    pack.__path__ = [str(ROOT)]
    monkeypatch.setitem(sys.modules, "ovi_pack_under_test", pack)
    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(output)

    def get_save_image_path(prefix, out):  # ComfyUI's rule, reduced to what one save needs: counter 1
        sub, name = os.path.split(prefix)
        return os.path.join(out, sub), name, 1, sub, prefix

    fp.get_save_image_path = get_save_image_path
    fp.get_annotated_filepath = lambda name: os.path.join(output, name)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return importlib.import_module("ovi_pack_under_test.nodes.latents")


def _latent():
    g = torch.Generator().manual_seed(0)
    return {"samples": torch.randn(1, 48, 31, 4, 4, generator=g), "ovi_audio": torch.randn(1, 157, 20, generator=g),
            "ovi": {"variant": "720x720_5s", "seed": 3, "height": 64, "width": 64, "mode": "t2av", "prompt": "p",
                    "settings": {"steps": 2}}}


def test_latent_save_into_a_broken_folder(broken_folder, monkeypatch):
    folder, what, mounted = broken_folder
    latents = _nodes_latents(monkeypatch, folder)
    final = folder / "latents" / "Ovi_00001_.safetensors"
    with pytest.raises(OSError) as e:  # on the read-only mount the latents/ subfolder cannot even be made
        latents.OviSaveLatent().save(_latent(), "latents/Ovi")
    _assert_named_and_clean(str(e.value), final, final.parent if final.parent.is_dir() else folder, what)


def test_latent_save_and_load_round_trip(tmp_path, monkeypatch):
    latents = _nodes_latents(monkeypatch, tmp_path)
    saved = latents.OviSaveLatent().save(_latent(), "latents/Ovi")["ui"]["latents"][0]
    assert saved["filename"] == "Ovi_00001_.safetensors" and os.listdir(tmp_path / "latents") == [saved["filename"]]
    (back,) = latents.OviLoadLatent().load(f"latents/{saved['filename']}")
    ref = _latent()
    assert torch.equal(back["samples"], ref["samples"]) and torch.equal(back["ovi_audio"], ref["ovi_audio"])
    assert back["ovi"] == ref["ovi"]


def test_convert_into_a_broken_folder(broken_folder, tiny_dir, capsys):
    folder, what, mounted = broken_folder
    src = tiny_dir / "Ovi" / "model_960x960_10s.safetensors"
    for target, name in (("fp8", "o_fp8.safetensors"), ("gguf-q8_0", "o.gguf")):
        final = folder / name
        assert main(["convert", "--to", target, str(src), str(final)]) == 1
        err = capsys.readouterr().err
        _assert_named_and_clean(err, final, folder, what)


def test_generate_reports_a_full_disk_by_name(tiny_dir, tmp_path, monkeypatch, capsys):
    """The CLI turns a write failure into a one-line error naming the file and exit status 1."""
    out = tmp_path / "clip.mp4"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_write.os, "fsync", full)
    rc = main(_generate_args(tiny_dir, out))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"error: [Errno {errno.ENOSPC}] cannot write clip.mp4 into {tmp_path}: No space left on device" in err
    assert os.listdir(tmp_path) == []
