"""Train one run: the plain loop that defines what training computes.

    import bnjax
    history, state = bnjax.train(bnjax.TrainConfig(batch_norm=True), bnjax.load_mnist())

One run on one device, in the manner of flax/examples' `train_and_evaluate`:
a `for` over the steps, each calling the jitted `train_step` on the next
batch, and every `eval_every` steps (and after the last) an evaluation on
the test set. From here to BN is three calls: `train` -> `train_step`
(training/steps.py) -> the net's `__call__` (nets/models.py) ->
`BatchNorm.__call__` (bn/batchnorm.py).

Many runs at once (stacked programs, several steps per dispatch, worker
processes, devices, hosts) are the engine's job (`bnjax.train_many`,
bnjax/engine/): it computes what this loop computes, and tests/test_engine.py
holds every one of its strategies to this loop.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.support.xla_flags import apply_cpu_flags
from bnjax.training.checkpoint import save_checkpoint, start_or_resume
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import default_eval_chunk, evaluate
from bnjax.training.history import EvalCallback, History, has_diverged, launch_record
from bnjax.training.precise_bn import precise_batches_for
from bnjax.training.schedule import check_dataset, epoch_order, resolve_steps
from bnjax.training.steps import TrainState, matmul_precision, to_float_images, train_step


def train(
    config: TrainConfig,
    data,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    probe: Callable[[TrainState], dict] | None = None,
) -> tuple[History, TrainState]:
    """Train one model on `data` (a `bnjax.data.datasets.Dataset`) on one
    device; evaluate it on the test set every `config.eval_every` steps and
    after the last; return (history, final_state).

    `on_eval(config, step, total_steps, record)` follows each evaluation (for
    progress output). A run whose training loss diverges (`has_diverged`)
    stops there, marked `diverged`. With `checkpoint_path` the whole run is
    saved there after every evaluation, and a run that finds its checkpoint
    resumes from it, to the History it would have reached uninterrupted.
    `probe(state) -> dict of floats` is measured at every evaluation
    (`history.probes`).
    """
    apply_cpu_flags()  # bnjax's XLA:CPU settings, if no JAX computation has run in this process yet
    check_dataset(data)
    if config.num_devices not in (None, 1):
        raise ValueError(f"train runs on one device, got num_devices {config.num_devices}; "
                         "bnjax.train_many([config], data) splits each batch over several")
    steps_per_epoch, total_steps = resolve_steps(config, len(data.x_train))
    state, history = _start(config, checkpoint_path)
    evaluate_test_set = _test_set_evaluator(config, data)
    start_time = time.perf_counter() - history.total_wall_time_s
    first_step = int(state.step)
    metric_sums, summed_steps = {"loss": 0.0, "accuracy": 0.0}, 0

    with matmul_precision(config):  # traced under the config's matmul precision
        for step in range(first_step, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0 or step == first_step:
                order = epoch_order(config, epoch, len(data.x_train))
            batch = order[position * config.batch_size:(position + 1) * config.batch_size]
            state, metrics = train_step(state, to_float_images(jnp.asarray(data.x_train[batch])),
                                        jnp.asarray(data.y_train[batch]))
            metric_sums = jax.tree_util.tree_map(jnp.add, metric_sums, metrics)
            summed_steps += 1
            if (step + 1) % config.eval_every and step + 1 < total_steps:
                continue

            train_means = {f"train_{key}": float(np.float64(total) / summed_steps) for key, total in metric_sums.items()}
            record = {"steps": step + 1, **train_means, **evaluate_test_set(state, history)}
            record["wall_time_s"] = history.total_wall_time_s = time.perf_counter() - start_time
            history.append(record)
            if probe is not None:
                history.probes.append(probe(state))
            history.diverged = has_diverged(record["train_loss"])
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, state, history, config)
            if on_eval is not None:
                on_eval(config, step + 1, total_steps, record)
            if history.diverged:
                break
            metric_sums, summed_steps = {"loss": 0.0, "accuracy": 0.0}, 0

    history.total_wall_time_s = time.perf_counter() - start_time
    return history, state


def _start(config: TrainConfig, checkpoint_path) -> tuple[TrainState, History]:
    """The run's state and History to start from (`start_or_resume`), with the plain loop's launch record."""
    state, history = start_or_resume(config, checkpoint_path, jax.default_backend())
    history.launch = launch_record("plain", jax.default_backend(), 1,
                                   eval_chunk=default_eval_chunk(jax.default_backend()))
    return state, history


def _test_set_evaluator(config: TrainConfig, data) -> Callable[[TrainState, History], dict]:
    """`evaluate_test_set(state, history) -> record`: the test set's loss and
    accuracy with BN's running averages and, as `config.eval_statistics`
    asks, with precise or batch statistics (the time each took added to the
    history)."""
    test_images, test_labels = jax.device_put((data.x_test, data.y_test))
    precise_batches = precise_batches_for(config, data.x_train)
    chunk = default_eval_chunk(jax.default_backend())

    def evaluate_test_set(state: TrainState, history: History) -> dict:
        start = time.perf_counter()
        running = evaluate(state, test_images, test_labels, config.eval_batch_size, chunk=chunk)
        history.eval_time_s += time.perf_counter() - start
        record = {"val_accuracy": running["accuracy"], "val_loss": running["loss"]}
        if config.eval_statistics != "running":
            start = time.perf_counter()
            other = evaluate(state, test_images, test_labels, config.eval_batch_size, chunk=chunk,
                             statistics=config.eval_statistics, precise_batches=precise_batches)
            history.eval_statistics_time_s += time.perf_counter() - start
            record.update({f"{config.eval_statistics}_val_{key}": value for key, value in other.items()})
        return record

    return evaluate_test_set
