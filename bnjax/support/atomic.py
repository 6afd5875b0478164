"""Write files so that a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Yield a file object whose contents replace `path` only if the block succeeds.

    The data goes to a temporary file in the same directory, is flushed to disk,
    then renamed over `path` (an atomic step on POSIX and Windows). On an error
    the temporary file is removed and `path` keeps its old contents. The file
    gets the mode a plain `open` would give it (0666 less the umask), not
    mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `atomic_write(path)` would fail, or None: checked before work
    whose result would otherwise be lost at the end. `path` must not be a
    folder, and its nearest existing ancestor must be a folder this process
    can write into. The missing folders are made here, so that one that
    cannot be made (e.g. under /proc) is found now, not after the work."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; give a file path"
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write into {ancestor}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the folder {path.parent} ({error.strerror})"
    return None


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as standard JSON, atomically: NaN and infinities, which JSON
    has no words for, are written as null."""
    with atomic_write(path, "w") as file:
        json.dump(_finite_or_null(data), file, indent=1, allow_nan=False)
        file.write("\n")


def _finite_or_null(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_null(value) for value in data]
    return data
