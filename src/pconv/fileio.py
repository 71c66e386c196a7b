"""Atomic writes: a temp file in the target folder, fsync, then rename. A crash never leaves a half file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputExistsError, PconvError


def check_output(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{str(path)!r} already exists", "pass --force (force=True in Python) to overwrite it")
    if not path.parent.exists():
        raise PconvError(f"folder {str(path.parent)!r} does not exist", "create it first")
    return path


def atomic_write(path: str | Path, write: Callable[[str], None], force: bool = False) -> Path:
    """Call `write(tmp_path)`, then move the finished file into place."""
    path = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and writers that replace the file) leave it private (0600); give it the mode a plain
        # open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
