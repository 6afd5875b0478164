"""A run's life outside its iteration, written once for both loops: the plain
loop (`bnjax.train`, one run) and the engine's (`bnjax.train_many`, stacked
runs) call these, and differ only in how they step.

    steps_per_epoch, total_steps = schedule_of(config, data)
    state, history = start(config, checkpoint_path, platform, launch)
    ... train until the next evaluation ...
    evaluations = evaluate_timed(evaluate_with, config.eval_statistics)
    record = record_evaluation(history, step, train_means, evaluations, wall_time_s, probed)
    ... save_checkpoint, on_eval(config, step, total_steps, record) ...

The engine calls `start` and `record_evaluation` once per run of its
stack, with that run's values (`evaluations_of_run`).
"""

from __future__ import annotations

import time
from typing import Callable

import jax

from bnjax.support.provenance import effective_precision
from bnjax.training.checkpoint import checkpoint_exists, restore_checkpoint
from bnjax.training.config import TrainConfig
from bnjax.training.history import History, has_diverged
from bnjax.training.schedule import check_dataset, resolve_steps
from bnjax.training.steps import create_train_state

# {statistics: ({"loss": ..., "accuracy": ...}, seconds it took)}: "running"
# always, and the config's other `eval_statistics` ("precise", "batch") if any.
Evaluations = dict[str, tuple[dict, float]]


def schedule_of(config: TrainConfig, data) -> tuple[int, int]:
    """Check `data` (a `Dataset`) and return (steps_per_epoch, total_steps) for `config`."""
    check_dataset(data)
    return resolve_steps(config, len(data.x_train))


def start(config: TrainConfig, checkpoint_path, platform: str, launch: dict, num_devices: int = 1,
          conv_implementation: str = "lax", *, step: int | None = None):
    """(state, History) the run starts from: fresh from the config's seed, or
    the checkpoint's state and History where `checkpoint_path` exists (its
    latest step, or `step`). The
    History says how `platform` computes the config's products and carries
    `launch`, the loop's `launch_record`."""
    state, history = create_train_state(config, jax.random.key(config.seed), num_devices, conv_implementation), History()
    if checkpoint_path is not None and checkpoint_exists(checkpoint_path):
        state, saved_history = restore_checkpoint(checkpoint_path, state, config, step)
        history = History(**saved_history)
    history.precision = effective_precision(platform, config.compute_dtype, config.matmul_precision)
    history.launch = launch
    return state, history


def evaluate_timed(evaluate_with: Callable[[str], dict], eval_statistics: str) -> Evaluations:
    """`evaluate_with(statistics)` on the test set with BN's running averages
    and then, if `eval_statistics` asks, with precise or batch statistics;
    each timed (`evaluate_with` returns once its numbers are on the host)."""
    evaluations = {}
    for statistics in dict.fromkeys(("running", eval_statistics)):
        start_time = time.perf_counter()
        values = evaluate_with(statistics)
        evaluations[statistics] = (values, time.perf_counter() - start_time)
    return evaluations


def evaluations_of_run(evaluations: Evaluations, index: int) -> Evaluations:
    """Run `index`'s values of a stacked evaluation (arrays of R values per measure)."""
    return {statistics: ({key: values[index] for key, values in measured.items()}, seconds)
            for statistics, (measured, seconds) in evaluations.items()}


def record_evaluation(history: History, step: int, train_means: dict, evaluations: Evaluations,
                      wall_time_s: float, probed: dict | None = None) -> dict:
    """Append one evaluation of a run to its `history` and return its record:
    the mean training loss and accuracy since the last evaluation
    (`train_means`), the test set's loss and accuracy with each kind of
    statistics, the wall time, the probe's values (`probed`, if the run has
    a probe) and whether the run has now diverged (`has_diverged`)."""
    running, running_seconds = evaluations["running"]
    record = {"steps": step, "train_loss": float(train_means["loss"]),
              "train_accuracy": float(train_means["accuracy"]),
              "val_accuracy": float(running["accuracy"]), "val_loss": float(running["loss"])}
    history.eval_time_s += running_seconds
    for statistics, (values, seconds) in evaluations.items():
        if statistics == "running":
            continue
        record[f"{statistics}_val_accuracy"] = float(values["accuracy"])
        record[f"{statistics}_val_loss"] = float(values["loss"])
        history.eval_statistics_time_s += seconds
    record["wall_time_s"] = history.total_wall_time_s = wall_time_s
    history.append(record)
    if probed is not None:
        history.probes.append(probed)
    history.diverged = has_diverged(record["train_loss"])
    return record
