"""Files kiln writes and reads safely, for every module: atomic writes (a reader or a crash never sees
half a file or directory), durable renames, and JSON that is checked as it is read. It depends on
nothing else in kiln but its errors, so any module may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

# A write that failed for want of space: the disk's, or the user's quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DAMAGED = "the file is damaged (an interrupted save or copy?)"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (what was created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    """The C library's ``renameat2`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        function.restype = ctypes.c_int
    return function


def exchange_dirs(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``RENAME_EXCHANGE``); False where the C
    library or the file system cannot, and the caller falls back to two renames."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD (<fcntl.h>), RENAME_EXCHANGE (<linux/fs.h>)
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def temporary_sibling(target: Path) -> Path:
    """A new empty directory next to ``target``, named after it, with a new directory's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    # mkdtemp makes it private (0700); the renamed directory (an exported model/) should have the
    # permissions any new directory gets, so that a service account can read it.
    tmp.chmod(0o777 & ~umask())
    return tmp


def settle_file(stream: Any) -> None:
    """Give an open file the permissions of any new file, then make it durable. safetensors writes
    its files private (0600), which would keep a service account from reading an exported model."""
    os.fchmod(stream.fileno(), 0o666 & ~umask())
    os.fsync(stream.fileno())


def sync_files(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as stream:
                settle_file(stream)
    fsync_dir(directory)


def new_dir(target: Path) -> tuple[Path, Callable[[], None]]:
    """:func:`atomic_dir` for a directory kiln does not own (a user's ``-o``): a temporary sibling and
    a function that syncs it and renames it to ``target``. Nothing but that temporary directory is
    ever removed (no stale siblings are cleaned up, nothing is replaced): the rename takes the place
    of a missing or empty ``target`` only, and a target that has files by then is a KilnError."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)

    def commit() -> None:
        sync_files(tmp)
        try:
            os.rename(tmp, target)  # replaces an empty directory, refuses one with entries
        except OSError:
            raise KilnError("exists and is not empty (now); nothing was replaced", target) from None
        fsync_dir(target.parent)

    return tmp, commit


def read_json(path: Path, required: tuple[str, ...] = ()) -> Any:
    """Parse a JSON file kiln loads; with ``required``, it must be an object with those keys.

    A missing, empty or damaged file is a :class:`KilnError` naming it (and the line, for bad JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise KilnError("file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KilnError(f"not a text file; {DAMAGED}", path) from None
    if not text.strip():
        raise KilnError(f"empty file; {DAMAGED}", path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise KilnError(f"not valid JSON ({err.msg}, column {err.colno}); {DAMAGED}", path, err.lineno) from None
    if required:
        if not isinstance(value, dict):
            raise KilnError(f"expected a JSON object, found {type(value).__name__}; {DAMAGED}", path)
        missing = [key for key in required if key not in value]
        if missing:
            raise KilnError(f"missing {', '.join(repr(k) for k in missing)}; {DAMAGED}", path)
    return value


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[Any]:
    """A text (or ``binary``) stream whose content appears at ``path`` only when the block ends
    without an error: it is written to a temporary sibling that is then renamed, so a reader (or a
    crash) never sees half a file. The file gets the permissions of any new file, not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # else a power cut after the rename can leave an empty file
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as out:
        out.write(text)
