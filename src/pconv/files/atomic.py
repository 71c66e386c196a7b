"""Atomic writes: a temp file in the target folder, fsync, then rename. A crash never leaves a half file.

Ctrl-C (SIGINT) and SIGTERM (what `timeout`, CI runners and job schedulers send) both end a write cleanly:
while a write runs, SIGTERM raises `Terminated` in the main thread, so the temp file is removed before the
process exits. Only SIGKILL can leave a temp file (`.<name>.*.tmp`, or the `.tmp*` safetensors writes next
to it), and then only in the output's own folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputExistsError, PconvError


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (a BaseException, like KeyboardInterrupt: cleanup runs, nothing
    catches it by accident)."""


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler: raise Terminated where the main thread is."""
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated instead of killing the process (main thread only; a
    handler someone else installed is left alone)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse an existing file (without force) or a folder pconv cannot write to, before any work."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{str(path)!r} already exists", "pass --force (force=True in Python) to overwrite it")
    if path.is_dir():
        raise PconvError(f"{str(path)!r} is a folder", "give a file name, e.g. snn.safetensors")
    folder = path.parent
    if not folder.is_dir():
        raise PconvError(f"folder {str(folder)!r} does not exist", "create it first")
    try:  # root passes os.access on a read-only file system, so try it
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PconvError(f"cannot write to folder {str(folder)!r}: {e.strerror or e}",
                         "choose a folder you can write to") from None
    return path


def atomic_write(path: str | Path, write: Callable[[str], None], force: bool = False) -> Path:
    """Call `write(tmp_path)`, then move the finished file into place; an error or a signal leaves nothing."""
    path = check_output(path, force)
    with sigterm_raises():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            try:
                write(tmp)
            except Exception as e:  # an OSError, or the error type of the writer (safetensors has its own)
                raise _write_error(path, e) from None
            # mkstemp (and writers that replace the file) leave it private (0600); give it the mode a plain
            # open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _ignore_further_signals()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def _ignore_further_signals() -> None:
    """A second SIGTERM during cleanup must not cut it short."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _write_error(path: Path, error: Exception) -> PconvError:
    text = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PconvError(f"cannot write {str(path)!r}: {text}",
                      "check the free disk space and the folder's permissions; nothing was written")
