"""Training many runs at once: `train_many` groups runs into vmapped programs
and worker processes as a `Strategy` (bnjax/strategy.py) says.

    from bnjax.engine import Strategy, default_strategy, train_many
    results = train_many(configs, data)       # [(History, TrainState)] in config order
    history, state = train(config, data, strategy=Strategy(steps_per_dispatch=100))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax.strategy import Strategy, default_strategy
from bnjax.train import (
    History,
    TrainConfig,
    TrainState,
    check_dataset,
    create_train_state,
    epoch_order,
    eval_step,
    make_mesh,
    resolve_steps,
    to_float_images,
    train,
    train_step_body,
)
from bnjax.workers import WorkerPool


# Fields that may differ between the runs of one vmapped program.
PER_MODEL_FIELDS = ("seed", "learning_rate")


def program_key(config: TrainConfig) -> tuple:
    """Runs with equal keys share one architecture and schedule: one program."""
    return tuple((k, v) for k, v in sorted(dataclasses.asdict(config).items()) if k not in PER_MODEL_FIELDS)


def _optimizer_with_learning_rate_in_state(config: TrainConfig) -> optax.GradientTransformation:
    """The config's optimizer with its learning rate kept in the optimizer state
    (`optax.inject_hyperparams`), so that vmapped runs may each have their own."""
    if config.optimizer == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate, b1=config.adam_b1,
                                                    b2=config.adam_b2, eps=config.adam_eps)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate)


def _stacked_states(configs: list[TrainConfig]) -> TrainState:
    """The runs' initial states stacked along a leading model axis, sharing one
    optimizer object (so that they have one pytree structure)."""
    tx = _optimizer_with_learning_rate_in_state(configs[0])
    states = []
    for config in configs:
        state = create_train_state(config, jax.random.key(config.seed))
        opt_state = _optimizer_with_learning_rate_in_state(config).init(state.params)
        states.append(state.replace(tx=tx, opt_state=opt_state))
    leaves = [jax.tree_util.tree_leaves(state) for state in states]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(states[0]),
                                        [jnp.stack(column) for column in zip(*leaves)])


def _many_steps(state, metric_sums, train_images, train_labels, epoch_orders, first_step, length, steps_per_epoch,
                batch_size, unroll):
    """`length` steps of every model (leading axis of `state`, `metric_sums`,
    `epoch_orders`) from global step `first_step`, in one program."""

    def one_model_step(state, sums, orders, step):
        epoch, step_in_epoch = step // steps_per_epoch, step % steps_per_epoch
        indices = jax.lax.dynamic_slice(orders[epoch], (step_in_epoch * batch_size,), (batch_size,))
        state, metrics = train_step_body(state, to_float_images(train_images[indices]), train_labels[indices])
        return state, jax.tree_util.tree_map(jnp.add, sums, metrics)

    all_models_step = jax.vmap(one_model_step, in_axes=(0, 0, 0, None))

    def body(carry, offset):
        return all_models_step(*carry, epoch_orders, first_step + offset), None

    (state, metric_sums), _ = jax.lax.scan(body, (state, metric_sums), jnp.arange(length), unroll=unroll)
    return state, metric_sums


_many_steps_jit = jax.jit(_many_steps, static_argnames=("length", "steps_per_epoch", "batch_size", "unroll"),
                          donate_argnames=("state", "metric_sums"))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _evaluate_many(state, test_images, test_labels, chunk):
    """Summed loss and correct count of every model over one test batch."""
    return jax.vmap(functools.partial(eval_step, chunk=chunk), in_axes=(0, None, None))(state, test_images, test_labels)


def _train_program(configs: list[TrainConfig], data, strategy: Strategy, on_eval=None) -> list[tuple]:
    """Train `configs` (one program_key) as one vmapped program."""
    config = configs[0]
    steps_per_epoch, total_steps = resolve_steps(config, len(data.x_train))
    state = _stacked_states(configs)
    train_images, train_labels, test_images, test_labels = (jnp.asarray(array) for array in data)
    epoch_orders = jnp.asarray(np.stack([np.stack([epoch_order(c, epoch, len(data.x_train))
                                                   for epoch in range(c.epochs)]) for c in configs]))
    histories = [History() for _ in configs]
    zero_sums = lambda: {"loss": jnp.zeros(len(configs)), "accuracy": jnp.zeros(len(configs))}  # noqa: E731
    metric_sums, steps_in_sums, step = zero_sums(), 0, 0
    start_time = time.perf_counter()
    while step < total_steps and not all(history.diverged for history in histories):
        next_eval = min(total_steps, (step // config.eval_every + 1) * config.eval_every)
        length = min(strategy.steps_per_dispatch, next_eval - step)
        state, metric_sums = _many_steps_jit(state, metric_sums, train_images, train_labels, epoch_orders, step,
                                             length=length, steps_per_epoch=steps_per_epoch,
                                             batch_size=config.batch_size, unroll=strategy.unroll)
        step += length
        steps_in_sums += length
        if step % config.eval_every and step != total_steps:
            continue
        train_accuracy = np.asarray(metric_sums["accuracy"]) / steps_in_sums
        train_loss = np.asarray(metric_sums["loss"]) / steps_in_sums
        eval_start = time.perf_counter()
        loss_sums, correct = np.zeros(len(configs)), np.zeros(len(configs), np.int64)
        for first in range(0, len(test_labels), config.eval_batch_size):
            batch = slice(first, first + config.eval_batch_size)
            totals = _evaluate_many(state, to_float_images(test_images[batch]), test_labels[batch],
                                    chunk=strategy.eval_chunk)
            loss_sums, correct = loss_sums + np.asarray(totals["loss_sum"]), correct + np.asarray(totals["correct"])
        eval_time = time.perf_counter() - eval_start
        for index, history in enumerate(histories):
            if history.diverged:  # stopped recording where the per-run loop would have stopped
                continue
            record = {"steps": step, "val_accuracy": float(correct[index]) / len(test_labels),
                      "val_loss": float(loss_sums[index]) / len(test_labels),
                      "train_accuracy": float(train_accuracy[index]), "train_loss": float(train_loss[index]),
                      "wall_time_s": time.perf_counter() - start_time}
            for key, value in record.items():
                getattr(history, key).append(value)
            history.eval_time_s += eval_time
            history.diverged = not math.isfinite(record["train_loss"])
            if on_eval is not None:
                on_eval(configs[index], step, total_steps, record)
        metric_sums, steps_in_sums = zero_sums(), 0
    total_time = time.perf_counter() - start_time
    results = []
    for index, history in enumerate(histories):
        history.total_wall_time_s = total_time  # the whole program's time, shared by its runs
        results.append((history, jax.tree_util.tree_map(lambda leaf: leaf[index], state)))
    return results


def _train_group(configs: list[TrainConfig], data, strategy: Strategy, on_eval=None) -> list[tuple]:
    """One run through `train`, or several as one vmapped program."""
    if len(configs) == 1:
        config = configs[0]
        progress = None if on_eval is None else (lambda step, total, record: on_eval(config, step, total, record))
        return [train(config, data, on_eval=progress, strategy=strategy)]
    return _train_program(configs, data, strategy, on_eval)


# Worker processes (Strategy.parallel_runs, bnjax/workers.py) train whole
# groups and send back plain arrays: a TrainState holds functions (apply_fn,
# the optimizer), so this process rebuilds it.

def _train_group_in_worker(data, progress, indices: list[int], configs: list[TrainConfig],
                           strategy: Strategy) -> list[tuple]:
    def on_eval(config, step, total, record):
        progress((next(i for i, c in zip(indices, configs) if c is config), step, total, record))

    outcomes = _train_group(configs, data, strategy, on_eval)
    return [(history, jax.device_get((state.step, state.params, state.batch_stats,
                                      jax.tree_util.tree_leaves(state.opt_state))))
            for history, state in outcomes]


def _rebuilt_state(config: TrainConfig, arrays, vmapped: bool) -> TrainState:
    step, params, batch_stats, opt_leaves = arrays
    if vmapped:  # the layout _train_program returns: one model's slice of a stacked state
        state = jax.tree_util.tree_map(lambda leaf: leaf[0], _stacked_states([config]))
    else:
        state = create_train_state(config, jax.random.key(config.seed))
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state),
                                             [jnp.asarray(leaf) for leaf in opt_leaves])
    return state.replace(step=jnp.asarray(step), params=jax.tree_util.tree_map(jnp.asarray, params),
                         batch_stats=jax.tree_util.tree_map(jnp.asarray, batch_stats), opt_state=opt_state)


def _run_groups_in_workers(groups: list[list[int]], configs, data, strategy: Strategy, on_eval, finish) -> None:
    available = sorted(os.sched_getaffinity(0))
    cores = [available[worker % len(available)] for worker in range(min(strategy.parallel_runs, len(groups)))]
    one_process = dataclasses.replace(strategy, parallel_runs=1)
    # Longest first (more steps, then BN, the slower net), so that no worker is
    # left with a long run at the end while the others idle.
    longest_first = lambda group: (-resolve_steps(configs[group[0]], len(data.x_train))[1],  # noqa: E731
                                   not configs[group[0]].batch_norm)
    groups = sorted(groups, key=longest_first)
    tasks = [(group, [configs[i] for i in group], one_process) for group in groups]

    def on_progress(task_index, message):
        index, step, total, record = message
        if on_eval is not None:
            on_eval(configs[index], step, total, record)

    with WorkerPool(cores, shared=data) as pool:
        for task_index, outcomes in pool.run(_train_group_in_worker, tasks, on_progress):
            group = groups[task_index]
            for index, (history, arrays) in zip(group, outcomes):
                finish(index, history, _rebuilt_state(configs[index], arrays, vmapped=len(group) > 1))


def train_many(
    configs: list[TrainConfig],
    data,
    strategy: Strategy | None = None,
    on_eval: Callable[[TrainConfig, int, int, dict], None] | None = None,
    on_done: Callable[[TrainConfig, History, TrainState], None] | None = None,
) -> list[tuple[History, TrainState]]:
    """Train every config; return [(history, final_state)] in config order.

    Runs that share a `program_key` (all fields but seed and learning rate)
    train together as one vmapped program of up to
    `strategy.models_per_program` runs; with 1, or on several devices, each
    run goes through `train` alone. With `strategy.parallel_runs` > 1 (CPU),
    up to that many of these runs or programs train at once in worker
    processes, one core each. `on_eval(config, step, total_steps, record)`
    after each evaluation of a run; `on_done(config, history, state)` when a
    run (or its program) finishes, so callers can save as they go. Both are
    called in this process, with the caller's own config objects.

    The states of vmapped runs keep their optimizer with the learning rate in
    its state (`optax.inject_hyperparams`), and every run of a program reports
    the program's wall time.
    """
    check_dataset(data)
    if not configs:
        return []
    first_platform = jax.devices()[0].platform
    strategy = strategy or default_strategy(first_platform)
    results: dict[int, tuple] = {}
    by_key: dict[tuple, list[int]] = {}
    multi_device = False
    for index, config in enumerate(configs):
        several_devices = make_mesh(config).size > 1
        multi_device = multi_device or several_devices
        alone = strategy.models_per_program == 1 or several_devices
        by_key.setdefault(("alone", index) if alone else program_key(config), []).append(index)
    groups = [indices[start:start + strategy.models_per_program]
              for indices in by_key.values() for start in range(0, len(indices), strategy.models_per_program)]

    def finish(index, history, state):
        results[index] = (history, state)
        if on_done is not None:
            on_done(configs[index], history, state)

    # Worker processes only for one-device CPU runs, and only when two or more can overlap.
    if strategy.parallel_runs > 1 and len(groups) > 1 and first_platform == "cpu" and not multi_device:
        _run_groups_in_workers(groups, configs, data, strategy, on_eval, finish)
    else:
        for group in groups:
            for index, (history, state) in zip(group, _train_group([configs[i] for i in group], data, strategy,
                                                                   on_eval)):
                finish(index, history, state)
    return [results[index] for index in range(len(configs))]
