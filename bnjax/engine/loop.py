"""The engine's loop: R >= 1 runs of one program, on a mesh of one or more
devices, with evaluation, probes, checkpoints and divergence for every run.
It computes what the plain loop (`bnjax.train`) computes, run by
run, and is what makes many runs fast: the runs stacked, several steps per
dispatch, the data on the devices.

    results = train_runs(configs, data)   # [(History, TrainState)] in config order

The runs' states are stacked along a leading runs axis. `train_runs` is one
loop over evaluation intervals: train the interval (`_train_interval`: one or
more dispatches of the jitted chunk `_chunk`, whose step count is traced, so
every interval runs one compiled program), evaluate (`evaluate_timed`: one
dispatch per kind of BN statistics), record, checkpoint, report. Each step is
`train_step_body`, applied to the one run directly when
R == 1 and `vmap`ped over the runs otherwise, inside `shard_map` over the
mesh when it has several devices. `train_many`
groups runs into calls of this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.support.xla_flags import version_tuple
from bnjax.training.checkpoint import (check_same_config, checkpoint_exists, common_step, read_checkpoint,
                                       save_checkpoint)
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import evaluate_runs
from bnjax.training.history import History, launch_record
from bnjax.training.lifecycle import evaluate_timed, evaluations_of_run, record_evaluation, schedule_of, start
from bnjax.training.precise_bn import precise_batches_for
from bnjax.training.runs import for_each_run, run_of, stack_runs
from bnjax.training.schedule import epoch_order
from bnjax.training.steps import (DATA_AXIS, TrainState, make_mesh, matmul_precision, to_float_images,
                                  train_step_body)

# Fields that may differ between the runs of one program: everything else
# (architecture, batch, schedule, devices) must be equal.
PER_RUN_FIELDS = ("seed", "learning_rate")

# A stack of ghost-BN runs on a mesh (vmap inside shard_map, the running
# statistics averaged over devices) trains each run as alone from jax 0.10 on;
# below it, each run's training departs from its own after the first step
# (tests/test_parallel.py), so such a stack is refused there.
STACKED_GHOST_BN_FROM = (0, 10)


def program_key(config: TrainConfig) -> tuple:
    """Runs with equal keys share one architecture and schedule: one program."""
    return tuple((field.name, getattr(config, field.name)) for field in dataclasses.fields(config)
                 if field.name not in PER_RUN_FIELDS)


# ---------------------------------------------------------------- training steps

def _runs_step(state, images, labels, axis_name, ghost_bn):
    """One `train_step_body` of every run; images (R, B, ...) and labels (R, B)."""
    step = functools.partial(train_step_body, axis_name=axis_name, ghost_bn=ghost_bn)
    return for_each_run(lambda run: step(*run), (state, images, labels))


class StepData(NamedTuple):
    """What every step of a chunk reads, on the devices: the training set
    (uint8 images and labels) and each run's batch orders of the epochs
    `orders_first_epoch` .. + W - 1 ((R, W, N) int32)."""

    train_images: jax.Array
    train_labels: jax.Array
    epoch_orders: jax.Array
    orders_first_epoch: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What is fixed for the whole program (static under jit): the schedule,
    the mesh, ghost BN, and how a chunk loops over its steps (`_chunk`)."""

    steps_per_epoch: int
    batch_size: int
    mesh: jax.sharding.Mesh
    ghost_bn: bool
    loop: str = "step"


def _step(carry, step, data: StepData, plan: StepPlan):
    """Global step `step` of every run: gather each run's batch from the
    device-resident training set, take one step (data-parallel over the
    mesh), add its metrics to the running sums."""
    state, metric_sums = carry
    epoch, step_in_epoch = step // plan.steps_per_epoch - data.orders_first_epoch, step % plan.steps_per_epoch
    indices = jax.vmap(lambda orders: jax.lax.dynamic_slice(orders[epoch], (step_in_epoch * plan.batch_size,),
                                                            (plan.batch_size,)))(data.epoch_orders)
    images, labels = to_float_images(data.train_images[indices]), data.train_labels[indices]
    if plan.mesh.size == 1:
        state, metrics = _runs_step(state, images, labels, None, False)
    else:  # state replicated, every run's batch split over the devices
        state, metrics = jax.shard_map(
            functools.partial(_runs_step, axis_name=DATA_AXIS, ghost_bn=plan.ghost_bn), mesh=plan.mesh,
            in_specs=(P(), P(None, DATA_AXIS), P(None, DATA_AXIS)), out_specs=(P(), P()),
        )(state, images, labels)
    return state, jax.tree_util.tree_map(jnp.add, metric_sums, metrics)


def _chunk(state, metric_sums, data: StepData, first_step, num_steps, plan: StepPlan):
    """`num_steps` consecutive steps of every run from global step
    `first_step`, in one dispatch. `plan.loop` says how (both step numbers
    are traced, so every interval runs one compiled program, an epoch
    boundary inside it included):
      "step"      one step (`num_steps` must be 1): no loop at all;
      "while"     a `lax.fori_loop` over a traced number of steps;
      "unrolled"  a `lax.scan` of exactly `num_steps` steps, unrolled
                  (`num_steps` is then static: one program per length).
    """
    step = functools.partial(_step, data=data, plan=plan)
    if plan.loop == "step":
        return step((state, metric_sums), first_step)
    if plan.loop == "unrolled":
        carry, _ = jax.lax.scan(lambda carry, offset: (step(carry, first_step + offset), None),
                                (state, metric_sums), jnp.arange(num_steps), unroll=True)
        return carry
    return jax.lax.fori_loop(0, num_steps, lambda offset, carry: step(carry, first_step + offset),
                             (state, metric_sums))


_train_chunk = jax.jit(_chunk, static_argnames="plan", donate_argnames=("state", "metric_sums"))
_train_chunk_unrolled = jax.jit(_chunk, static_argnames=("plan", "num_steps"), donate_argnames=("state", "metric_sums"))


def _run_chunk(strategy: Strategy, state, metric_sums, first_step: int, num_steps: int, data: StepData,
               plan: StepPlan):
    """`num_steps` steps of every run from `first_step`, launched as `strategy` says."""
    if strategy.steps_per_dispatch == 1:
        return _train_chunk(state, metric_sums, data, first_step, 1, dataclasses.replace(plan, loop="step"))
    if strategy.unroll:
        return _train_chunk_unrolled(state, metric_sums, data, first_step, num_steps,
                                     dataclasses.replace(plan, loop="unrolled"))
    return _train_chunk(state, metric_sums, data, first_step, num_steps, dataclasses.replace(plan, loop="while"))


# ---------------------------------------------------------------- the loop

def _initial_states(configs, mesh, checkpoint_paths, strategy: Strategy):
    """Every run's fresh state, or its checkpoint's, and its History so far,
    carrying the engine's launch record. The runs of one program resume
    together from the latest step all their checkpoints hold, or start
    afresh where they share none (the same Histories either way: only the
    time of the steps trained again is lost)."""
    platform, conv_implementation = mesh.devices.flat[0].platform, strategy.stacked_conv if len(configs) > 1 else "lax"
    launched = {key: value for key, value in dataclasses.asdict(strategy).items() if key != "parallel_runs"}
    program = [[c.seed, c.learning_rate] for c in configs]
    resume_step = common_step(checkpoint_paths)
    if resume_step is None:  # afresh: what is there is overwritten, so it must be these runs' own
        for config, path in zip(configs, checkpoint_paths):
            if path is not None and checkpoint_exists(path):
                check_same_config(path, read_checkpoint(path)["config"], config)
    states, histories = [], []
    for index, (config, path) in enumerate(zip(configs, checkpoint_paths)):
        launch = launch_record("engine", platform, mesh.size, strategy=launched, program=program,
                               index_in_program=index)
        state, history = start(config, path if resume_step is not None else None, platform, launch, mesh.size,
                               conv_implementation, step=resume_step)
        states.append(state)
        histories.append(history)
    return states, histories


def _check_program(configs: list[TrainConfig], mesh) -> None:
    """Refuse, in one line, runs that cannot share one program."""
    config = configs[0]
    differing = [c for c in configs if program_key(c) != program_key(config)]
    if differing:
        raise ValueError(f"runs of one program may differ only in {', '.join(PER_RUN_FIELDS)}; "
                         f"{differing[0]} differs from {config} elsewhere")
    if len(configs) > 1 and mesh.size > 1 and config.ghost_bn and version_tuple(jax.__version__) < STACKED_GHOST_BN_FROM:
        raise ValueError(f"ghost BN runs over {mesh.size} devices cannot share one program with jax {jax.__version__} "
                         "(at jax 0.7.1 they trained differently from each run alone); train them one per program "
                         "or use jax >= 0.10")


def _device_inputs(configs: list[TrainConfig], data, replicated) -> dict:
    """What the program reads, on every device once: the whole data set as
    uint8 (47 MB for MNIST; batches are gathered and converted to float
    there, then split over the devices) and, for precise BN, its training
    batches. The batch orders come per interval (`_batch_orders`)."""
    config = configs[0]
    train_images, train_labels, test_images, test_labels = jax.device_put(tuple(data), replicated)
    precise_batches = precise_batches_for(config, data.x_train)
    if precise_batches is not None:
        precise_batches = jax.device_put(precise_batches, replicated)
    return {"train_images": train_images, "train_labels": train_labels, "test_images": test_images,
            "test_labels": test_labels, "precise_batches": precise_batches}


def _orders_window(steps_per_epoch: int, total_steps: int, eval_every: int) -> int:
    """How many epochs' batch orders the devices hold at once: as many as one
    evaluation interval can span, and no more than the runs train. Memory
    thus follows the steps trained, never the epochs declared."""
    epochs_trained = -(-total_steps // steps_per_epoch)
    return max(1, min(epochs_trained, (eval_every - 1) // steps_per_epoch + 2))


def _batch_orders(configs: list[TrainConfig], window: int, num_examples: int, replicated, first_epoch: int):
    """Every run's order of the training set in epochs `first_epoch` ..
    `first_epoch` + `window` - 1: (R, window, N) int32 on every device."""
    return jax.device_put(np.stack([[epoch_order(c, epoch, num_examples)
                                     for epoch in range(first_epoch, first_epoch + window)] for c in configs]),
                          replicated)


def _evaluation_steps(first_step: int, total_steps: int, eval_every: int):
    """The steps after which the runs are evaluated: every `eval_every`-th and the last."""
    step = first_step
    while step < total_steps:
        step = min(total_steps, (step // eval_every + 1) * eval_every)
        yield step


def _train_interval(strategy: Strategy, state, metric_sums, first_step: int, last_step: int, data: StepData,
                    plan: StepPlan):
    """Steps `first_step` .. `last_step` - 1 of every run, `strategy.steps_per_dispatch` per dispatch."""
    step = first_step
    while step < last_step:
        length = min(strategy.steps_per_dispatch, last_step - step)
        state, metric_sums = _run_chunk(strategy, state, metric_sums, step, length, data, plan)
        if strategy.await_each_dispatch:
            jax.block_until_ready(state)
        step += length
    return state, metric_sums


def _interval_trainer(configs: list[TrainConfig], strategy: Strategy, mesh, inputs: dict, steps_per_epoch: int,
                      total_steps: int) -> Callable:
    """`train_interval(state, first_step, last_step) -> (state, train_means)`:
    steps `first_step` .. `last_step` - 1 of every run, and the mean training
    loss and accuracy of each run over them (float64 arrays of R)."""
    config, replicated = configs[0], NamedSharding(mesh, P())
    plan = StepPlan(steps_per_epoch, config.batch_size, mesh, config.ghost_bn)
    # Built again only when an interval starts in a new epoch.
    batch_orders = functools.lru_cache(maxsize=1)(functools.partial(
        _batch_orders, configs, _orders_window(steps_per_epoch, total_steps, config.eval_every),
        len(inputs["train_labels"]), replicated))

    def train_interval(state, first_step: int, last_step: int):
        # Zero sums placed as the chunk's outputs are, so that every chunk call finds the same program.
        zero_sums = jax.device_put({"loss": jnp.zeros(len(configs)), "accuracy": jnp.zeros(len(configs))}, replicated)
        first_epoch = first_step // steps_per_epoch
        data = StepData(inputs["train_images"], inputs["train_labels"], batch_orders(first_epoch), first_epoch)
        state, metric_sums = _train_interval(strategy, state, zero_sums, first_step, last_step, data, plan)
        # Reading the sums waits for the queued steps, so it comes before the evaluation's clock starts.
        steps = last_step - first_step
        return state, {key: np.asarray(sums, np.float64) / steps for key, sums in metric_sums.items()}

    return train_interval


def _evaluator(config: TrainConfig, strategy: Strategy, mesh, inputs: dict) -> Callable:
    """`evaluate_with(state, statistics) -> {"loss", "accuracy"}` of every run
    (arrays of R values) on the device-resident test set (`evaluate_runs`)."""
    def evaluate_with(state, statistics: str) -> dict:
        return evaluate_runs(state, inputs["test_images"], inputs["test_labels"], config.eval_batch_size, mesh,
                             strategy.eval_chunk, statistics=statistics, precise_batches=inputs["precise_batches"])

    return evaluate_with


def _record(histories: list[History], state, step: int, train_means: dict, evaluations, probes,
            elapsed: Callable[[], float]) -> list[tuple[int, dict]]:
    """Record one evaluation in every run's History that has not diverged
    (`record_evaluation`); return [(run index, its record)]. A run that has
    diverged records nothing after that, as it would alone."""
    recorded = []
    for index, history in enumerate(histories):
        if history.diverged:
            continue
        probed = probes[index](run_of(state, index)) if probes[index] is not None else None
        record = record_evaluation(history, step, {key: means[index] for key, means in train_means.items()},
                                   evaluations_of_run(evaluations, index), elapsed(), probed)
        recorded.append((index, record))
    return recorded


def _save_checkpoints(checkpoint_paths, state, histories: list[History], configs, elapsed: Callable[[], float],
                      mesh):
    """Stamp every History with the wall time so far, then save each run that
    has a checkpoint path: once, by process 0, when the mesh spans several
    processes (jax.distributed); by this process when it trains the runs alone."""
    alone = all(device.process_index == jax.process_index() for device in mesh.devices.flat)
    for index, history in enumerate(histories):
        history.total_wall_time_s = elapsed()
        if checkpoint_paths[index] is not None and (alone or jax.process_index() == 0):
            save_checkpoint(checkpoint_paths[index], run_of(state, index), history, configs[index])


def train_runs(
    configs: list[TrainConfig],
    data,
    strategy: Strategy | None = None,
    on_eval: Callable[[int, int, int, dict], None] | None = None,
    probes: list[Callable[[TrainState], dict] | None] | None = None,
    checkpoint_paths: list[str | None] | None = None,
    devices=None,
) -> list[tuple[History, TrainState]]:
    """Train `configs` (runs of one program: equal `program_key`) together on
    `data` (a `bnjax.data.datasets.Dataset`); return [(history, final_state)] in order.

    Each run is evaluated on the test set every `eval_every` steps and at the
    end; `on_eval(index, step, total_steps, record)` follows each evaluation
    of run `configs[index]`.
    A run whose training loss diverges (`has_diverged`) stops recording there
    and is marked `diverged` (its program stops when all runs have).
    `probes[i](state) -> dict of floats` is measured on run i's state at each
    of its evaluations (`history.probes`). With `checkpoint_paths[i]`, run i
    is saved there after every evaluation and resumes from it: an interrupted
    run reaches the same History as an uninterrupted one.

    `strategy` (default: `default_strategy` for the devices used) sets how the
    steps are launched, never what they compute. `devices`: where the runs
    train (the first `num_devices` of them; default `jax.devices()`).
    """
    config, num_runs = configs[0], len(configs)
    steps_per_epoch, total_steps = schedule_of(config, data)
    mesh = make_mesh(config, devices)
    _check_program(configs, mesh)
    strategy = strategy or default_strategy(mesh.devices.flat[0].platform, mesh.size)
    probes = probes or [None] * num_runs
    checkpoint_paths = checkpoint_paths or [None] * num_runs
    replicated = NamedSharding(mesh, P())
    states, histories = _initial_states(configs, mesh, checkpoint_paths, strategy)
    state = jax.device_put(stack_runs(states), replicated)
    inputs = _device_inputs(configs, data, replicated)
    train_interval = _interval_trainer(configs, strategy, mesh, inputs, steps_per_epoch, total_steps)
    evaluate_with = _evaluator(config, strategy, mesh, inputs)
    start_time = time.perf_counter() - max(history.total_wall_time_s for history in histories)
    elapsed = lambda: time.perf_counter() - start_time  # noqa: E731

    step = int(states[0].step)
    with matmul_precision(config):  # traced under the config's precision
        for next_eval in _evaluation_steps(step, total_steps, config.eval_every):
            if all(history.diverged for history in histories):
                break
            state, train_means = train_interval(state, step, next_eval)
            step = next_eval
            evaluations = evaluate_timed(functools.partial(evaluate_with, state), config.eval_statistics)
            recorded = _record(histories, state, step, train_means, evaluations, probes, elapsed)
            _save_checkpoints(checkpoint_paths, state, histories, configs, elapsed, mesh)
            if on_eval is not None:
                for index, record in recorded:
                    on_eval(index, step, total_steps, record)

    total_time = elapsed()
    for history in histories:
        history.total_wall_time_s = total_time
    return [(history, run_of(state, index)) for index, history in enumerate(histories)]
