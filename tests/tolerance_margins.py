"""How close each float comparison of the suite comes to its tolerance, on the
CPU that runs it: a pytest plugin, off unless asked for.

    BNJAX_TOLERANCE_REPORT=/tmp/margins.jsonl python -m pytest -p tests.tolerance_margins ...
    python -m tests.tolerance_margins /tmp/margins.jsonl       # the call sites, closest first

Every `np.testing.assert_allclose` call (and every `tolerances.assert_close`,
which calls it) records its call site and the ratio
max |actual - desired| / (atol + rtol |desired|): 1.0 is the edge, where the
check fails. The suite's float32 tolerances must hold on every CPU the tests
may run on (float32 round-off differs between code paths: SSE, AVX2,
AVX-512), so a ratio above 1/3 on any CPU is a tolerance to re-derive. The
records are appended one JSON line each (xdist workers share the file).
"""

import json
import os
import sys
import traceback

import numpy as np

REPORT = os.environ.get("BNJAX_TOLERANCE_REPORT")
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _ratio(actual, desired, rtol, atol) -> float:
    actual = np.asarray(actual, dtype=np.float64) if np.isrealobj(actual) else np.asarray(actual)
    desired = np.asarray(desired, dtype=np.float64) if np.isrealobj(desired) else np.asarray(desired)
    actual, desired, atol = np.broadcast_arrays(actual, desired, np.asarray(atol, dtype=np.float64))
    finite = np.isfinite(actual) & np.isfinite(desired)
    if not finite.any():
        return 0.0
    allowed = atol[finite] + rtol * np.abs(desired[finite])
    difference = np.abs(actual[finite] - desired[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(allowed > 0, difference / np.where(allowed > 0, allowed, 1), np.where(difference > 0, np.inf, 0))
    return float(ratios.max())


def _call_site() -> str:
    """The innermost frame in a test file (not this plugin nor tolerances.py)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_TESTS_DIR) and os.path.basename(frame.filename) not in (
                "tolerance_margins.py", "tolerances.py"):
            return f"{os.path.relpath(frame.filename, os.path.dirname(_TESTS_DIR))}:{frame.lineno}"
    return "?"


def pytest_configure(config):
    if not REPORT:
        return
    original = np.testing.assert_allclose

    def recording_assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        try:
            ratio = _ratio(actual, desired, rtol, atol)
        except Exception:  # a comparison this plugin cannot measure is left to numpy to judge
            ratio = None
        if ratio is not None:
            record = {"site": _call_site(), "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
                      "ratio": ratio, "rtol": rtol, "atol": float(np.max(atol))}
            with open(REPORT, "a") as report:
                report.write(json.dumps(record) + "\n")
        return original(actual, desired, rtol, atol, *args, **kwargs)

    np.testing.assert_allclose = recording_assert_allclose


def summarize(paths: list[str], threshold: float = 0.0) -> list[tuple[str, float, str]]:
    """The largest ratio seen at each call site over the given reports, largest first."""
    worst: dict[str, tuple[float, str]] = {}
    for path in paths:
        with open(path) as report:
            for line in report:
                record = json.loads(line)
                if record["ratio"] >= worst.get(record["site"], (-1.0, ""))[0]:
                    worst[record["site"]] = (record["ratio"], record["test"])
    rows = sorted(((site, ratio, test) for site, (ratio, test) in worst.items()), key=lambda row: -row[1])
    return [row for row in rows if row[1] >= threshold]


if __name__ == "__main__":
    for site, ratio, test in summarize(sys.argv[1:]):
        print(f"{ratio:8.3f}  {site:40s} {test}")
