"""Value checks shared by the configs and the functions that take settings:
each raises one ValueError, one line naming the value and what is allowed."""

from __future__ import annotations

import argparse
import math
import sys


def is_integer(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_integer(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    """`value` is an integer >= `minimum` (1 or 0), or None when `optional`."""
    if optional and value is None:
        return
    if not is_integer(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def check_positive_real(name: str, value) -> None:
    if not is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(sorted(allowed))}")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends in one line (`error: ...`, exit
    status 2) instead of the usage block followed by the error; a program
    run as `python -m module` is named so."""

    def __init__(self, *args, **kwargs):
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if "prog" not in kwargs and spec is not None:
            kwargs["prog"] = f"python -m {spec.name.removesuffix('.__main__')}"
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")
