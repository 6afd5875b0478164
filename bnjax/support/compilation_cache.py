"""JAX's persistent compilation cache, on by default for the project's
entry points (`python -m bnjax`, every study's sweep, the benchmarks).

A sweep compiles a handful of programs (a training interval, an evaluation,
a model's initialization) once per architecture; on a GPU that is most of a
short sweep's time. With the cache, a second sweep on the same machine loads
them from disk instead (docs/performance.md has cold and warm figures).

The cache lives in `<bnjax cache>/jax` (the data cache's folder:
$BNJAX_CACHE_DIR, else ~/.cache/bnjax). A user's own JAX cache settings win:
with JAX_COMPILATION_CACHE_DIR set, or `jax_compilation_cache_dir` already
configured, nothing is changed; BNJAX_COMPILATION_CACHE=0 turns it off.
Every program is kept, not only those that took over a second to compile
(JAX's default), unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says
otherwise. A loaded program is the same executable, so no number changes.

The settings go into the environment too, so worker processes and other
processes started from here use the same cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from bnjax.support.cache_dir import default_cache_dir

DIR_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
MIN_TIME_ENV_VAR = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
DISABLE_ENV_VAR = "BNJAX_COMPILATION_CACHE"


def use_persistent_cache() -> str | None:
    """Turn the cache on (module doc) unless the user configured or disabled
    it. Call it before the first compilation.

    Returns:
      The directory in use, or None where BNJAX_COMPILATION_CACHE=0 turned it off.
    """
    if os.environ.get(DISABLE_ENV_VAR) == "0":
        return None
    configured = os.environ.get(DIR_ENV_VAR) or jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    directory = str(Path(default_cache_dir()) / "jax")
    os.environ[DIR_ENV_VAR] = directory
    os.environ.setdefault(MIN_TIME_ENV_VAR, "0")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[MIN_TIME_ENV_VAR]))
    return directory
