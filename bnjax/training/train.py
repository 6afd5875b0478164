"""Train one run: the plain loop that defines what training computes.

    import bnjax
    history, state = bnjax.train(bnjax.TrainConfig(batch_norm=True), bnjax.load_mnist())

One run on one device, in the manner of flax/examples' `train_and_evaluate`:
a `for` over the steps, each calling the jitted `train_step` on the next
batch, and every `eval_every` steps (and after the last) an evaluation on
the test set. From here to BN is three calls: `train` -> `train_step`
-> the net's `__call__` (`ConvNet`, `MLP` or `LSTM`) -> `BatchNorm.__call__`.

Many runs at once (stacked programs, several steps per dispatch, worker
processes, devices, hosts) are the engine's job (`bnjax.train_many`): it
computes what this loop computes, and the engine's tests hold every one of
its strategies to this loop.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.data.sources import Dataset
from bnjax.training.checkpoint import save_checkpoint
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import default_eval_chunk, evaluate
from bnjax.training.history import EvalCallback, History, launch_record
from bnjax.training.lifecycle import evaluate_timed, record_evaluation, schedule_of, start
from bnjax.training.precise_bn import precise_batches_for
from bnjax.training.schedule import epoch_order
from bnjax.training.steps import TrainState, matmul_precision, to_float_images, train_step


def train(
    config: TrainConfig,
    data: Dataset,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    probe: Callable[[TrainState], dict] | None = None,
) -> tuple[History, TrainState]:
    """Train one model on one device, evaluating it on the test set every
    `config.eval_every` steps and after the last. A run whose training loss
    diverges (`has_diverged`) stops there, marked `diverged`.

    Args:
      config: the run (`TrainConfig`): model, BN, optimizer, schedule, seed.
      data: a `Dataset` (`bnjax.load_mnist()`, `bnjax.load_dataset(...)`).
      on_eval: called as `on_eval(config, step, total_steps, record)` after
        each evaluation (`record`: the curves' values at that step).
      checkpoint_path: where the whole run is saved after every evaluation; a
        run that finds its checkpoint there resumes from it, to the History
        it would have reached uninterrupted.
      probe: `probe(state) -> dict of floats`, measured at every evaluation.

    Returns:
      (history, final_state): the run's `History` (curves, times, probes,
      launch record) and its `TrainState` (params, batch_stats, opt_state).
    """
    if config.num_devices not in (None, 1):
        raise ValueError(f"train runs on one device, got num_devices {config.num_devices}; "
                         "bnjax.train_many([config], data) splits each batch over several")
    steps_per_epoch, total_steps = schedule_of(config, data)
    platform = jax.default_backend()
    state, history = start(config, checkpoint_path, platform,
                           launch_record("plain", platform, 1, eval_chunk=default_eval_chunk(platform)))
    evaluate_with = _test_set_evaluator(config, data)
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

            train_means = {key: np.float64(total) / summed_steps for key, total in metric_sums.items()}
            evaluations = evaluate_timed(functools.partial(evaluate_with, state), config.eval_statistics)
            record = record_evaluation(history, step + 1, train_means, evaluations,
                                       time.perf_counter() - start_time, probe(state) if probe else None)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, state, history, config)
            if on_eval is not None:
                on_eval(config, step + 1, total_steps, record)
            if history.diverged:
                break
            metric_sums, summed_steps = {"loss": 0.0, "accuracy": 0.0}, 0

    history.total_wall_time_s = time.perf_counter() - start_time
    return history, state


def _test_set_evaluator(config: TrainConfig, data) -> Callable[[TrainState, str], dict]:
    """`evaluate_with(state, statistics) -> {"loss", "accuracy"}` on the test
    set, with BN normalizing by `statistics` (`evaluate`); the test set and
    precise BN's training batches put on the device once."""
    test_images, test_labels = jax.device_put((data.x_test, data.y_test))
    precise_batches = precise_batches_for(config, data.x_train)
    chunk = default_eval_chunk(jax.default_backend())

    def evaluate_with(state: TrainState, statistics: str) -> dict:
        return evaluate(state, test_images, test_labels, config.eval_batch_size, chunk=chunk,
                        statistics=statistics, precise_batches=precise_batches)

    return evaluate_with
