"""Where bnjax keeps what it downloads and compiles: the data sets' verified
copies and JAX's persistent compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "BNJAX_CACHE_DIR"


def default_cache_dir() -> Path:
    """$BNJAX_CACHE_DIR if set, else ~/.cache/bnjax."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "bnjax").expanduser()
