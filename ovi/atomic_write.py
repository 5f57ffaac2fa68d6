"""Files that appear complete or not at all: every file the pack writes goes through ``AtomicOutput``.

The data goes to a temporary file in the target's own folder (same filesystem, so the final rename is
atomic), is flushed and fsynced, then ``os.replace``d over the target; the folder is fsynced after the
rename so the new name survives a power cut. Any failure, including KeyboardInterrupt and ComfyUI's
interrupt exception (a BaseException), removes the temporary file, and an OSError is re-raised with the
final file named in its message (errno and OSError subclass kept), e.g.
``cannot write clip.mp4 into /out: No space left on device``.

Temporary names, the one pattern every writer of the pack uses (and the only one ``sweep_stale`` removes):

    .<final name>[<kind>].ovi-<pid>-<8 hex digits>.partial      e.g. .clip.mp4.ovi-4242-1f2e3d4c.partial

Hidden, so file pickers and ComfyUI's counters skip it; the pid says which process writes it. A process
killed with SIGKILL (or a power cut) cannot clean up, so ``sweep_stale`` removes such files later: a file
is stale when its mtime is older than the start of this run and the process named in it is gone (or is
this process, so the pid was reused). A file of another live process is never touched, and nothing that
does not match the pattern is (downloads' ``.incomplete`` files, for one, are resumable and stay).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from .log import log

TEMP_SUFFIX = ".partial"
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.ovi-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})" + re.escape(TEMP_SUFFIX) + "$")
# When this run started (the module is imported at start-up by the CLI and by the node pack): temporary
# files last modified before it cannot belong to a write of this run.
RUN_STARTED = time.time()
NEARLY_FULL = 1 << 20  # bytes free below which a short write without an errno is reported as a full disk


def temp_path(final: str | os.PathLike, kind: str = "") -> Path:
    """A fresh temporary name beside ``final`` in the pattern above (``kind`` tells helper files apart)."""
    final = Path(final)
    return final.with_name(f".{final.name}{kind}.ovi-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def named_error(e: OSError, final: str | os.PathLike) -> OSError:
    """``e`` again, its message saying which file could not be written (same errno, same OSError subclass)."""
    if getattr(e, "ovi_output", None) is not None:
        return e
    final = Path(final)
    what = f"cannot write {final.name} into {final.parent}"
    code = e.errno
    if code is None and _nearly_full(final.parent):
        code = errno.ENOSPC  # a short write with no errno (numpy's tofile, under gguf's writer) on a full disk
        err = OSError(code, f"{what}: {os.strerror(code)} ({e})")
    elif code is not None:
        err = OSError(code, f"{what}: {e.strerror or e}")
    else:
        err = OSError(f"{what}: {e}")
    err.ovi_output = str(final)
    return err


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def _pid_state(pid: int) -> bool | None:
    """True if process ``pid`` runs, False if it is gone (or a zombie), None where this cannot be told."""
    if os.name != "posix":
        return None  # Windows: os.kill(pid, 0) would send a Ctrl-C; an open file there cannot be unlinked anyway
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return None
    try:  # Linux: a killed child its parent has not reaped yet still answers signal 0
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def is_stale(path: str | os.PathLike, *, started: float | None = None) -> bool:
    """True for a temporary file of ours left by a run that cannot finish it any more (see the module doc)."""
    path = Path(path)
    m = TEMP_NAME.match(path.name)
    if m is None:
        return False
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    if mtime >= (RUN_STARTED if started is None else started):
        return False  # may be a write of this run, or of a run that started after it
    pid = int(m["pid"])
    if pid == os.getpid():
        return True  # older than this process: an earlier process had the same pid
    return _pid_state(pid) is not True


def sweep_stale(folder: str | os.PathLike, *, started: float | None = None) -> list[Path]:
    """Remove the stale temporary files of ours in ``folder`` (not below it); returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed  # a missing folder has nothing to sweep; writing there reports the real problem
    for entry in entries:
        if TEMP_NAME.match(entry.name) is None or not entry.is_file(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if not is_stale(path, started=started):
            continue
        try:
            path.unlink()
        except OSError as e:  # in use (Windows), or a read-only folder: leave it
            log.debug("could not remove the leftover temporary file %s: %s", path, e)
            continue
        log.info("removed %s, a temporary file left by an interrupted earlier run", path)
        removed.append(path)
    return removed


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


class AtomicOutput:
    """One output file written under a temporary name and moved into place only when complete.

        with AtomicOutput(path) as out:        # writes through out.write(...)
            out.write(data)
        with AtomicOutput(path, keep_open=False) as out:   # another writer (ffmpeg, gguf) fills out.tmp
            run_writer(out.tmp)

    A clean exit of the block commits (fsync, rename, folder fsync); an exception aborts (the temporary
    file is removed) and an OSError comes out naming ``path``. ``commit``/``abort`` may also be called
    directly; after either, the other is a no-op. Creating one sweeps stale temporary files of the
    folder first (``sweep_stale``).
    """

    def __init__(self, path: str | os.PathLike, *, keep_open: bool = True, kind: str = ""):
        self.path = Path(path)
        sweep_stale(self.path.parent)
        self.tmp = temp_path(self.path, kind)
        self.file = None
        self.done = False
        try:
            f = open(self.tmp, "xb")  # exclusive: fails now, clearly, on a missing or read-only folder
        except OSError as e:
            self.done = True
            raise named_error(e, self.path) from None
        if keep_open:
            self.file = f
        else:
            f.close()

    def write(self, data) -> None:
        """Append ``data`` (bytes-like); a failure removes the temporary file and names ``path``."""
        try:
            self.file.write(data)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise named_error(e, self.path) from e
            raise

    def commit(self) -> Path:
        """Flush, fsync and rename the temporary file to ``path``; returns ``path``."""
        if self.done:
            return self.path
        try:
            f = self.file if self.file is not None else open(self.tmp, "r+b")
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise named_error(e, self.path) from e
            raise
        self.done = True
        _fsync_folder(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (whatever state it is in); ``path`` is left as it was."""
        if self.done:
            return
        self.done = True
        if self.file is not None:
            try:
                self.file.close()  # may re-raise the failed flush (a full disk); the descriptor is closed anyway
            except OSError:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove the temporary file %s: %s", self.tmp, e)

    def __enter__(self) -> "AtomicOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError) and getattr(exc, "ovi_output", None) is None:
            raise named_error(exc, self.path) from exc
