"""Checks that an output path can be written, made before any model work starts.

A run that computes for an hour and then fails to save is the worst way to learn that ``-o``
points at a read-only file system. :func:`check_output_file` and :func:`check_output_dir` look at
the path the way the writer will use it and raise :class:`~innersight.errors.UserInputError`
naming the path and the reason:

* the path (or the folder that must hold it) is an existing file / folder of the wrong kind;
* a parent that would have to be created is a file (``notes.txt/out.png``);
* the nearest existing folder cannot be written: probed by creating and removing a temporary
  file there, so a read-only file system, missing permissions and quotas all show up (file mode
  bits alone would not stop root).

Nothing is created or left behind by a check. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import UserInputError

__all__ = ["check_output_dir", "check_output_file"]


def check_output_file(path: str | os.PathLike[str], option: str = "--output") -> Path:
    """Raise unless a file can be written at ``path`` (folders above it may still be missing).

    Returns ``path`` as a :class:`~pathlib.Path`."""
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"{option} {target}: is a folder; give a file name")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise UserInputError(f"{option} {target}: cannot write this file (permission denied)")
    _check_writable_ancestor(target.parent, target, option)
    return target


def check_output_dir(path: str | os.PathLike[str], option: str = "--output") -> Path:
    """Raise unless files can be written in folder ``path`` (created later if missing).

    Returns ``path`` as a :class:`~pathlib.Path`."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{option} {target}: is a file, not a folder")
    _check_writable_ancestor(target, target, option)
    return target


def _check_writable_ancestor(folder: Path, target: Path, option: str) -> None:
    """``folder`` or, when it does not exist yet, its nearest existing ancestor must be a folder in
    which a file can be created."""
    current = folder if str(folder) else Path(".")
    while not current.exists():
        if current.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserInputError(f"{option} {target}: {current} is a broken symbolic link")
        parent = current.parent
        if parent == current:
            break
        current = parent
    if not current.is_dir():
        raise UserInputError(f"{option} {target}: cannot create a folder under {current}, which is a file")
    try:
        handle, probe = tempfile.mkstemp(prefix=".innersight-write-check-", dir=current)
    except OSError as exc:
        raise UserInputError(f"{option} {target}: cannot write in {current} ({_reason(exc)})") from None
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError:  # pragma: no cover - we just created it
        pass


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.ENOENT:  # e.g. /proc: the folder exists but takes no new files
        return "this folder takes no new files"
    return exc.strerror or type(exc).__name__
