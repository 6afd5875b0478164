"""Training many runs: `train_many` groups runs into programs of the training
loop (`train_runs`), spreads them over devices and hosts or hands them to
worker processes, as the devices and a `Strategy` say.

    from bnjax.engine.strategy import Strategy, default_strategy
    from bnjax.engine.launch import train_many
    results = train_many(configs, data)       # [(History, TrainState)] in config order
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import threading
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bnjax.data.sources import Dataset
from bnjax.engine.loop import program_key, train_runs
from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.engine.workers import WorkerPool
from bnjax.support import host
from bnjax.support.xla_flags import backend_started
from bnjax.training.config import TrainConfig
from bnjax.training.history import History
from bnjax.training.schedule import check_dataset, resolve_steps
from bnjax.training.steps import TrainState, create_train_state, make_mesh

# make_probe(config, data) -> probe(state) -> dict: built where the run trains
# (in a worker process too), so it must be a module-level function or class.
ProbeFactory = Callable[[TrainConfig, object], Callable[[TrainState], dict]]


def checkpoint_file(checkpoint_dir: str | os.PathLike, config: TrainConfig) -> Path:
    """Where `train_many(..., checkpoint_dir=...)` keeps `config`'s run: an
    orbax checkpoint folder (training/checkpoint.py) named by a hash of the
    whole config."""
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(checkpoint_dir) / f"run-{digest}"


class Observer:
    """What the caller of `train_many` hears of its runs and decides for them,
    as one value. Subclass it and override the methods you need (each does
    nothing by default); they are called in the calling process, one call at
    a time, with the caller's own config objects.

    Args:
      make_probe: `make_probe(config, data) -> probe(state) -> dict of
        floats`, whose values each evaluation records (`history.probes`).
        The one thing that travels to where a run trains (a worker process
        too), so a module-level function or class.
      checkpoint_dir: the folder every run is saved in after each evaluation
        (`checkpoint_file`) and resumes from; `checkpoint_path` may say
        otherwise.
    """

    def __init__(self, make_probe: ProbeFactory | None = None, checkpoint_dir: str | os.PathLike | None = None):
        self.make_probe, self.checkpoint_dir = make_probe, checkpoint_dir

    def is_done(self, config: TrainConfig) -> bool:
        """Whether the run is finished already (a resumed sweep): not trained,
        and None in train_many's list unless its group has others to train."""
        return False

    def checkpoint_path(self, config: TrainConfig) -> str | os.PathLike | None:
        """Where the run is saved after every evaluation and resumes from (None: nowhere)."""
        return None if self.checkpoint_dir is None else checkpoint_file(self.checkpoint_dir, config)

    def on_eval(self, config: TrainConfig, step: int, total_steps: int, record: dict) -> None:
        """After each evaluation of the run: `record` holds the curves' values at `step`."""

    def on_done(self, config: TrainConfig, history: History, state: TrainState) -> None:
        """When the run has finished (or diverged)."""


@dataclasses.dataclass(frozen=True)
class GroupTraining:
    """How every group of runs trains, wherever it trains: the `strategy`
    (None: the default for the group's devices), the probe factory, and
    each run's checkpoint path (by its index in the caller's list)."""

    strategy: Strategy | None = None
    make_probe: ProbeFactory | None = None
    checkpoint_paths: tuple = ()


def _train_group(data, group: list[int], configs: list[TrainConfig], how: GroupTraining, report,
                 devices=None) -> list[tuple]:
    """Runs `group` (indices into `configs`) of one program through the
    engine's loop (`train_runs`); `report(index, step, total_steps, record)`."""
    program = [configs[index] for index in group]
    probes = [how.make_probe(config, data) for config in program] if how.make_probe is not None else None
    return train_runs(program, data, how.strategy, lambda position, *record: report(group[position], *record),
                      probes=probes,
                      checkpoint_paths=[how.checkpoint_paths[index] for index in group], devices=devices)


# Runs spread over devices: with D > 1 devices and at least D runs that would
# each split their batch over all of them (num_devices None, synchronized BN),
# every device trains whole runs at their full batch instead, with no
# collective at all: one thread per device takes the next group of runs.
# Synchronized BN over devices computes the statistics of the whole batch, so
# a run alone on one device is the same run (up to float round-off).

def _spread_over_devices(configs: list[TrainConfig], devices) -> list[TrainConfig] | None:
    """The configs as they train when spread over `devices` (the spreadable
    ones on one device each), or None when they are not spread."""
    spreadable = [config.num_devices is None and not config.ghost_bn for config in configs]
    if len(devices) < 2 or sum(spreadable) < len(devices):
        return None
    return [dataclasses.replace(config, num_devices=1) if spread else config
            for config, spread in zip(configs, spreadable)]


def _run_groups_over_devices(groups: list[list[int]], configs, placed: list[TrainConfig], data, how: GroupTraining,
                             report, finish, devices) -> list[list[int]]:
    """Each group of one-device runs whole on one of this process's `devices`,
    a thread per device taking the next group; `report` and `finish` are
    called one at a time. Over several processes (jax.distributed) each
    takes every P-th group, and then hears of the others' runs from them.
    Returns the groups left (runs over several devices)."""
    spread = [group for group in groups if placed[group[0]].num_devices == 1]
    pending = list(reversed(spread[jax.process_index()::jax.process_count()]))
    trained_here = {}
    lock = threading.Lock()

    def locked_report(*message):
        with lock:
            report(*message)

    errors = []

    def work(device):
        while not errors:
            with lock:
                if not pending:
                    return
                group = pending.pop()
            try:
                outcomes = _train_group(data, group, placed, how, locked_report, devices=[device])
                with lock:
                    for index, (history, state) in zip(group, outcomes):
                        finish(index, history, state)
                        if jax.process_count() > 1:
                            trained_here[index] = (history, _state_arrays(state))
            except Exception as error:  # noqa: BLE001 - raised in the calling thread below
                errors.append(error)
                return

    # Daemon threads: Ctrl-C in the calling thread ends the program without
    # waiting for the groups still training.
    threads = [threading.Thread(target=work, args=(device,), daemon=True) for device in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if jax.process_count() > 1:
        for index, (history, arrays) in _gathered(trained_here).items():
            if index not in trained_here:
                finish(index, history, _rebuilt_state(configs[index], arrays))
    return [group for group in groups if group not in spread]


def _gathered(outcomes: dict) -> dict:
    """Every process's `outcomes` ({run index: (History, state arrays)}),
    merged, on every process: one all-gather of their pickles."""
    payload = np.frombuffer(pickle.dumps(outcomes), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size])).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    merged = {}
    for size, row in zip(sizes, multihost_utils.process_allgather(padded)):
        merged.update(pickle.loads(row[:size].tobytes()))
    return merged


# Worker processes (Strategy.parallel_runs, engine/workers.py) train whole
# groups and send back plain arrays: a TrainState holds functions (apply_fn,
# the optimizer), so this process rebuilds it.

def _train_group_in_worker(data, progress, group: list[int], configs: list[TrainConfig],
                           how: GroupTraining) -> list[tuple]:
    outcomes = _train_group(data, group, configs, how, lambda *message: progress(message))
    return [(history, _state_arrays(state)) for history, state in outcomes]


def _state_arrays(state: TrainState):
    """A state's arrays as numpy, to send to another process (`_rebuilt_state` makes the state again)."""
    return jax.device_get((state.step, state.params, state.batch_stats, jax.tree_util.tree_leaves(state.opt_state)))


def _rebuilt_state(config: TrainConfig, arrays) -> TrainState:
    step, params, batch_stats, opt_leaves = arrays
    state = create_train_state(config, jax.random.key(config.seed))
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state),
                                             [jnp.asarray(leaf) for leaf in opt_leaves])
    return state.replace(step=jnp.asarray(step), params=jax.tree_util.tree_map(jnp.asarray, params),
                         batch_stats=jax.tree_util.tree_map(jnp.asarray, batch_stats), opt_state=opt_state)


def _run_groups_in_workers(groups: list[list[int]], configs, data, how: GroupTraining, report, finish) -> None:
    """The groups in up to `how.strategy.parallel_runs` worker processes, one core each."""
    available = host.core_ids_to_hand_out()  # pinned to on Linux; elsewhere they only number the workers
    cores = [available[worker % len(available)] for worker in range(min(how.strategy.parallel_runs, len(groups)))]
    in_one_process = dataclasses.replace(how, strategy=dataclasses.replace(how.strategy, parallel_runs=1))
    # Longest first (more steps, then BN, the slower net), so that no worker is
    # left with a long run at the end while the others idle.
    longest_first = lambda group: (-resolve_steps(configs[group[0]], len(data.x_train))[1],  # noqa: E731
                                   not configs[group[0]].batch_norm)
    groups = sorted(groups, key=longest_first)
    tasks = [(group, configs, in_one_process) for group in groups]

    def on_progress(task_index, message):
        report(*message)

    with WorkerPool(cores, shared=data) as pool:
        for task_index, outcomes in pool.run(_train_group_in_worker, tasks, on_progress):
            for index, (history, arrays) in zip(groups[task_index], outcomes):
                finish(index, history, _rebuilt_state(configs[index], arrays))


def _group_runs(configs: list[TrainConfig], models_per_program: int) -> tuple[list[list[int]], bool]:
    """The indices of `configs` grouped into programs: runs of one
    `program_key`, up to `models_per_program` per program, in config order; a
    run over several devices is a program of its own. Also whether any run
    spans several devices."""
    by_key: dict[tuple, list[int]] = {}
    multi_device = False
    for index, config in enumerate(configs):
        several_devices = make_mesh(config).size > 1
        multi_device = multi_device or several_devices
        alone = models_per_program == 1 or several_devices
        by_key.setdefault(("alone", index) if alone else program_key(config), []).append(index)
    groups = [indices[start:start + models_per_program]
              for indices in by_key.values() for start in range(0, len(indices), models_per_program)]
    return groups, multi_device


def _finished(configs: list[TrainConfig], observer: Observer) -> set[int]:
    """The indices of the runs `observer.is_done` says are finished; over
    several processes, process 0's answer, so that every process trains the
    same groups."""
    finished = [bool(observer.is_done(config)) for config in configs]
    if jax.process_count() > 1:
        finished = multihost_utils.broadcast_one_to_all(np.array(finished))
    return {index for index, is_finished in enumerate(finished) if is_finished}


def _layout(configs: list[TrainConfig], strategy: Strategy, platform: str):
    """How the runs train: groups of config indices (a program each), the
    configs as placed over the devices (None: as given), whether the groups
    go to worker processes, and this process's devices."""
    placed = _spread_over_devices(configs, jax.devices())  # every process's devices
    per_program = strategy.models_per_program if placed is None else \
        min(strategy.models_per_program, -(-len(configs) // jax.device_count()))  # a group for every device
    groups, multi_device = _group_runs(placed or configs, per_program)
    # Worker processes only for one-device CPU runs, and only when two or more can overlap.
    in_workers = placed is None and strategy.parallel_runs > 1 and len(groups) > 1 and platform == "cpu" \
        and not multi_device
    return groups, placed, in_workers, jax.local_devices()


def train_many(
    configs: list[TrainConfig],
    data: Dataset,
    strategy: Strategy | None = None,
    observer: Observer | None = None,
) -> list[tuple[History, TrainState] | None]:
    """Train every config, as fast as the devices allow, to the numbers
    `bnjax.train` gives each run alone (up to float round-off).

    Runs that share a `program_key` (all fields but seed and learning rate)
    train together as one vmapped program of the engine's loop, up to
    `strategy.models_per_program`; a run over several devices is a program
    of its own; with D > 1 devices and at least D runs that would split their
    batch over all of them, each run trains whole on one device instead.
    With `strategy.parallel_runs` > 1 (CPU), up to that many programs train at
    once in worker processes, one core each. Groups are decided from all
    configs, those the observer says are done included, so every run trains
    as in one uninterrupted call.

    Args:
      configs: the runs (`TrainConfig`s), in any order and mix.
      data: a `Dataset`, shared by every run.
      strategy: how the steps are launched (`Strategy`; default: the one for
        this platform), never what they compute.
      observer: an `Observer`: progress after each evaluation, each finished
        run, probes, checkpoints, runs done already.

    Returns:
      [(history, final_state)] in config order; None for a run of a group
      the observer says is done entirely.
    """
    check_dataset(data)
    if not configs:
        return []
    observer = observer or Observer()
    first_platform = jax.devices()[0].platform
    # How runs are grouped and whether workers are used follows the strategy
    # given or the default for this platform; a program given no strategy
    # takes the default for its own devices (`train_runs`).
    resolved = strategy or default_strategy(first_platform)
    results: dict[int, tuple] = {}
    groups, placed, in_workers, devices = _layout(configs, resolved, first_platform)
    finished = _finished(configs, observer)
    groups = [group for group in groups if not finished.issuperset(group)]

    def report(index, *record):
        if index not in finished:
            observer.on_eval(configs[index], *record)

    def finish(index, history, state):
        results[index] = (history, state)
        if index not in finished:
            observer.on_done(configs[index], history, state)

    how = GroupTraining(strategy, observer.make_probe, tuple(observer.checkpoint_path(config) for config in configs))
    if placed is not None:
        groups = _run_groups_over_devices(groups, configs, placed, data, how, report, finish, devices)
    if in_workers:
        _run_groups_in_workers(groups, configs, data, dataclasses.replace(how, strategy=resolved), report, finish)
    else:
        for group in groups:
            for index, (history, state) in zip(group, _train_group(data, group, configs, how, report)):
                finish(index, history, state)
    return [results.get(index) for index in range(len(configs))]


def launch_like(launch: dict) -> bool:
    """Set this process up as a run's launch record says its process was:
    its CPU cores (the first ones this process may use) and XLA flags. Only
    before this process's JAX has started (XLA reads both then). Returns
    whether the cores are as recorded: False where the record names a core
    count this process cannot be limited to (no affinity call on macOS or
    Windows) or does not have."""
    if backend_started():
        raise ValueError("a replay must set CPU cores and XLA flags before JAX starts; start a fresh process")
    if "xla_flags" in launch:
        os.environ["XLA_FLAGS"] = launch["xla_flags"]
    wanted = launch.get("cpu_cores")
    if not wanted:
        return True
    host.limit_cores(wanted)  # only where the platform can pin, and only to fewer cores
    return host.usable_core_count() == wanted


def replay(run: dict, data) -> History:
    """Train a saved run (a results file's run, or a `--save` file: its
    config, History and launch record) again as it was launched: its
    program's runs stacked with it as they were, with its strategy, on this
    process's devices; return its History. The CPU cores it had must be set
    before this process's JAX starts (`launch_like`; `python -m bnjax
    --replay` does both). On the machine that trained it, the History is
    the saved one, bit for bit."""
    launch = run.get("launch") or {}
    if launch.get("loop") != "engine":
        raise ValueError("this run has no record of an engine launch (it was trained by the plain loop, or saved "
                         "before runs recorded their launch), so it cannot be replayed as it was trained")
    if launch["devices"] > jax.device_count():
        raise ValueError(f"the run trained over {launch['devices']} devices; this process sees {jax.device_count()}")
    config = TrainConfig.from_dict(run["config"])
    program = [dataclasses.replace(config, seed=seed, learning_rate=learning_rate)
               for seed, learning_rate in launch["program"]]
    strategy = Strategy(**launch["strategy"])
    history, _ = train_runs(program, data, strategy)[launch["index_in_program"]]
    return history
