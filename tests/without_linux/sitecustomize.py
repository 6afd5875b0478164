"""A Linux machine made to look like macOS or Windows to bnjax: the calls only
Linux has are removed before anything else runs, in every Python process
that has this folder on its PYTHONPATH (pytest, its xdist workers, the
engine's worker processes, the CLI and notebook subprocesses the tests start).

    BNJAX_WITHOUT_LINUX=1 PYTHONPATH=tests/without_linux python -m pytest -m "not slow"

Removed: `os.sched_getaffinity` and `os.sched_setaffinity` (and
`os.process_cpu_count` becomes `os.cpu_count`, as Python 3.13's os.py makes
it on such platforms), `prctl` from the
C library (through ctypes) and reading `/proc` from bnjax's own code
(`bnjax/`, `experiments/`, `benchmarks/`; third-party libraries keep theirs).
A new Linux-only call in bnjax then fails the tests. `tests/conftest.py`
refuses to run with BNJAX_WITHOUT_LINUX=1 if this file was not loaded.
"""

import builtins
import ctypes
import io
import os
import sys
from pathlib import Path

_PROJECT = Path(__file__).resolve().parents[2]
_OURS = tuple(str(_PROJECT / folder) + os.sep for folder in ("bnjax", "experiments", "benchmarks"))

for _name in ("sched_getaffinity", "sched_setaffinity"):
    if hasattr(os, _name):
        delattr(os, _name)
if hasattr(os, "process_cpu_count"):  # Python >= 3.13: what os.py defines where there is no affinity call
    os.process_cpu_count = os.cpu_count

_cdll_getattr = ctypes.CDLL.__getattr__


def _no_prctl(library, name):
    if name == "prctl":
        raise AttributeError(f"{name} (removed by tests/without_linux: macOS and Windows have none)")
    return _cdll_getattr(library, name)


ctypes.CDLL.__getattr__ = _no_prctl

_open = builtins.open


def _open_without_proc(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith("/proc/"):
        callers = [sys._getframe(depth).f_code.co_filename for depth in (1, 2, 3)]  # through pathlib: 2 or 3
        if any(caller.startswith(_OURS) for caller in callers):
            raise FileNotFoundError(2, "No such file or directory (removed by tests/without_linux)", os.fspath(file))
    return _open(file, *args, **kwargs)


builtins.open = io.open = _open_without_proc
WITHOUT_LINUX = True
