"""Reading and writing files safely: every file netshrink reads from a user's path is opened by
:func:`open_regular`, and every file it writes goes through :func:`atomic_write`.

* Only regular files are read: a FIFO nobody writes to, a device or a folder would hang or never
  end, so each is refused before a byte is read (opened without blocking, then checked).

* The bytes go to a temporary file in the target's folder, are flushed to disk, then renamed over
  the target: a reader sees the old file or the new one, never half of one.
* The file gets the permissions an ordinary ``open(path, "w")`` would (0666 less the umask), not
  the 0600 that ``tempfile`` uses.
* A temporary file carries its writer's process id. A writer killed mid-write (SIGKILL, power
  loss) cannot delete its own; the next write to the same target removes those whose writer is
  gone, so they do not pile up.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import NetshrinkError


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading, or one NetshrinkError if it cannot be read or is not
    a regular file. Opening does not block (a FIFO's open would wait for a writer)."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, TypeError, ValueError) as exc:
        raise NetshrinkError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise NetshrinkError(f"cannot read {what} {path}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(handle, True)
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; restore at once
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of earlier writes to ``path`` whose writing process has died."""
    prefix = f".{path.name}."
    for candidate in path.parent.glob(f"{prefix}*.tmp"):
        pid_text = candidate.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            candidate.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Raise unless ``path`` can be written as a file (checked before long work starts): not a
    folder, not one of ``inputs`` (an output never replaces the file it was made from)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise NetshrinkError(f"path must be a file path (a str or os.PathLike). Received: path={path!r}")
    path = Path(path)
    if path.is_dir():
        raise NetshrinkError(f"output {path} is a folder; give a file name")
    for source in inputs:
        if source is not None and Path(source).exists() and path.exists() and path.samefile(source):
            raise NetshrinkError(f"output {path} is the input file; write to another name")
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists():  # the folders to create: check where they would go
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NetshrinkError(f"cannot write {path}: {existing} is not a writable folder")
    return path


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], int]) -> int:
    """Write ``data`` to ``path`` atomically with the user's umask; returns the byte count.
    ``data`` may be a function that writes into the open (seekable) file and returns the count,
    so large files need not be built in memory first."""
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NetshrinkError(f"cannot create the folder for {path}: {exc.strerror or exc}") from None
    _remove_orphans(path)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise NetshrinkError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as f:
            count = data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise NetshrinkError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return count
