"""Saving and reading sweep results: one JSON file with a top-level `runs` list."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax

from bnjax.data.datasets import DataError
from bnjax.support.atomic import atomic_write, write_json
from bnjax.support.provenance import environment
from bnjax.training.config import LEGACY_BN_FIELDS, TrainConfig


def run_key(config: dict) -> str:
    """A run is identified by its whole config (seed included). Saved configs
    are completed with today's defaults first, so results saved before a new
    TrainConfig field existed still match a run that leaves it at its default."""
    if not is_ours(config):  # saved by a newer bnjax: never the same run as one of ours
        return json.dumps(config, sort_keys=True)
    return json.dumps(TrainConfig.from_dict(config).to_dict(), sort_keys=True)


def is_ours(config: dict) -> bool:
    """Whether a saved config has only fields this bnjax knows (today's, or
    the flat form's BN fields that `TrainConfig.from_dict` reads)."""
    return set(config) <= {field.name for field in dataclasses.fields(TrainConfig)} | set(LEGACY_BN_FIELDS)


# The number curves every saved run holds, one value per evaluation; those it
# holds only when its config asked for them (empty otherwise); and its probes
# (one dict per evaluation, or none).
CURVES = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "wall_time_s")
OPTIONAL_CURVES = ("precise_val_accuracy", "precise_val_loss", "batch_val_accuracy", "batch_val_loss")


def load_results(path: Path) -> dict:
    """The saved results, or an empty file's worth if none exist yet. A file
    that cannot be read, or whose runs are not what bnjax writes, ends the
    program with one line naming the file and what is wrong; the file is left
    as it is. A number saved as null (bnjax writes NaN and infinities so, as
    standard JSON has neither) comes back as NaN."""
    if not path.exists():
        return {"environment": environment(), "runs": []}
    try:
        with open(path, encoding="utf-8") as file:
            results = json.load(file)
    except (OSError, ValueError) as error:  # ValueError: JSON syntax, bytes that are not UTF-8
        raise SystemExit(f"error: cannot read {path} ({error}); move it away to start a fresh sweep")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise SystemExit(f"error: {path} has no top-level 'runs' list; move it away to start a fresh sweep")
    for index, run in enumerate(results["runs"]):
        problem = _problem_with_run(run)
        if problem:
            raise SystemExit(f"error: {path}: run {index} {problem}; move the file away to start a fresh sweep")
        for key in CURVES + OPTIONAL_CURVES:
            run[key] = [math.nan if value is None else value for value in run.get(key, [])]
        if is_ours(run["config"]):  # the form TrainConfig.to_dict writes, from whichever bnjax saved it
            run["config"] = TrainConfig.from_dict(run["config"]).to_dict()
    return results


def _problem_with_run(run) -> str | None:
    """What makes `run` (one entry of a results file's `runs`) unusable, or None."""
    if not isinstance(run, dict):
        return f"is {type(run).__name__}, not an object"
    if not isinstance(run.get("config"), dict):
        return "has no config"
    try:
        run_key(run["config"])
    except (TypeError, ValueError) as error:
        return f"has an invalid config ({error})"
    steps = run.get("steps")
    if not isinstance(steps, list) or not all(type(step) is int and step > 0 for step in steps) \
            or steps != sorted(set(steps)):
        return f"has steps {str(steps)[:60]}, not increasing positive integers"
    for key in CURVES + OPTIONAL_CURVES + ("probes",):
        values = run.get(key, [])
        if not isinstance(values, list) or len(values) not in ((len(steps),) if key in CURVES else (0, len(steps))):
            return f"has {key} of {len(values) if isinstance(values, list) else type(values).__name__} " \
                   f"values for its {len(steps)} steps"
        if key != "probes" and not all(value is None or type(value) in (int, float) for value in values):
            return f"has {key} values that are not numbers"
    if not isinstance(run.get("diverged"), bool):
        return "has no diverged flag (true or false)"
    return None


def save_results(path: Path, results: dict) -> None:
    """Write `results` atomically; over several processes (jax.distributed)
    process 0 alone writes, every process keeping the same runs in memory."""
    results["environment"] = environment()
    if jax.process_index() == 0:
        write_json(path, results)


def unfinished(results: dict, configs: list[TrainConfig]) -> list[TrainConfig]:
    """The configs whose runs are not saved in `results` yet, in order."""
    done = {run_key(run["config"]) for run in results["runs"]}
    return [config for config in configs if run_key(config.to_dict()) not in done]


def add_run(path: Path, results: dict, config: TrainConfig, history, extra: dict | None = None) -> None:
    """Append one finished run (its config, History and any `extra` measurements
    of the final state) and save the file atomically."""
    results["runs"].append({"config": config.to_dict(), **history.to_dict(), **(extra or {})})
    save_results(path, results)


def last_full_interval_index(run: dict) -> int:
    """The index of a saved run's last evaluation that closes a full interval
    of `eval_every` steps (the final interval may be a short remainder)."""
    steps = [0] + run["steps"]
    full = [i for i in range(1, len(steps)) if steps[i] - steps[i - 1] == run["config"]["eval_every"]]
    return full[-1] - 1


def last_full_interval(run: dict, key: str) -> float:
    """`key` (e.g. "train_accuracy") over the last full evaluation interval."""
    return run[key][last_full_interval_index(run)]


def run_resumable(main) -> None:
    """Run a study's `main()` from the command line: an interrupt (exit 130)
    or a data error (exit 1) ends it with one line (its finished runs are
    already saved)."""
    try:
        main()
    except KeyboardInterrupt:  # exit 130, as a shell reports a process ended by Ctrl-C (python -m bnjax too)
        print("interrupted; finished runs are saved and will be skipped next time", file=sys.stderr)
        sys.exit(130)
    except DataError as error:
        sys.exit(f"error: {error}")


def save_figure(figure, path: Path, dpi: int) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a
    file) and close it."""
    import matplotlib.pyplot as plt  # the studies that plot choose the Agg backend first

    with atomic_write(path, "wb") as file:
        figure.savefig(file, format="png", dpi=dpi)
    plt.close(figure)
