"""Write files so that a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Yield a file object whose contents replace `path` only if the block succeeds.

    The data goes to a temporary file in the same directory, is flushed to disk,
    then renamed over `path` (an atomic step on POSIX and Windows). On an error
    the temporary file is removed and `path` keeps its old contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_write(path, "w") as file:
        json.dump(data, file, indent=1, allow_nan=True)
        file.write("\n")
