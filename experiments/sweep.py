"""The sweep driver every study trains through: resumable, with progress.

    parser = argparse.ArgumentParser(...)
    add_sweep_flags(parser, seeds=3, epochs=1, study="my_study")
    args = parser.parse_args(argv)
    out = output_folder(args, "my_study")   # runs/my_study/ unless --out names another
    results = run_sweep(configs, out / "results.json", load_mnist, strategy=sweep_strategy(args))

`run_sweep` trains every config whose run is not saved yet in the results
file (so an interrupted sweep resumes where it stopped) through
`bnjax.train_many` — worker processes and vmapped programs where the
engine chooses them — prints one progress line per evaluation with the
sweep's ETA, and saves each finished run atomically as soon as it is done.
`run_resumable(main)` (experiments/results.py) ends a study with one line on
an interrupt, a data error or a bad value. With `--checkpoint` the runs in
progress are saved too (`bnjax.Observer(checkpoint_dir=...)`, orbax
checkpoints under <out>/checkpoints/), so a stopped study resumes them
mid-run.

Where results go: `--out` if given; otherwise `runs/<study>/` (git-ignored).
There, a run whose config is already among the committed results (the same
path under `outputs/`) is copied from them instead of trained again, and
nothing committed is written. `--out outputs/<study>` regenerates those.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import jax

from bnjax.engine.launch import Observer, checkpoint_file, train_many
from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.support.atomic import unwritable_reason
from bnjax.support.compilation_cache import use_persistent_cache
from bnjax.training.config import TrainConfig, describe_bn
from bnjax.training.history import History
from bnjax.training.schedule import resolve_steps
from bnjax.training.tensorboard import write_tensorboard
from experiments.results import add_run, load_results, run_key, save_results, unfinished


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


COMMITTED = Path("outputs")  # the committed results, one folder per study
RUNS = Path("runs")  # a study's own results by default (git-ignored)


def add_sweep_flags(parser: argparse.ArgumentParser, seeds: int, epochs: int | None, study: str) -> None:
    """The flags every study shares: --seeds --epochs --max-steps --out --parallel-runs.
    `epochs=None`: the study fixes its own schedule and has no --epochs.
    `study`: its name, which names its folders (`output_folder`)."""
    parser.add_argument("--seeds", type=positive_int, default=seeds,
                        help=f"seeds 0..N-1 per configuration (default {seeds})")
    if epochs is not None:
        parser.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs per run (default {epochs})")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per run (smoke runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where results, figures and summary go (default {RUNS / study}/, starting from the "
                             f"committed runs of {COMMITTED / study}/, which stay as they are; "
                             f"--out {COMMITTED / study} regenerates those)")
    parser.add_argument("--parallel-runs", type=positive_int, default=None,
                        help="runs trained side by side, one CPU core each (default: the engine's choice, "
                             "all cores on CPU); 1 = one run at a time in this process")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write every run as TensorBoard event files under <out>/tensorboard/, one "
                             "folder per run (tensorboard --logdir <out>/tensorboard; needs tensorboardX)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="also save every run in progress at each evaluation, under <out>/checkpoints/ "
                             "(orbax checkpoints, deleted as each run is saved): a study stopped mid-run (a Colab "
                             "runtime that disconnects) resumes its runs where they were")
    parser.add_argument("--distributed", action="store_true",
                        help="join the processes of a multi-host run first (jax.distributed.initialize(), which "
                             "finds a Cloud TPU pod slice or a SLURM job itself); process 0 writes the results")


def output_folder(args: argparse.Namespace, study: str) -> Path:
    """Where this invocation writes (module doc), set as `args.out` and said:
    --out if given, else runs/<study>/."""
    if args.out is None:
        args.out = RUNS / study
        print(f"{study}: results go to {args.out}/ (runs already in {COMMITTED / study}/ are copied from there, "
              f"not trained again; {COMMITTED / study}/ is not written: --out {COMMITTED / study} rewrites it)",
              flush=True)
    return args.out


def committed_twin(results_path: Path) -> Path | None:
    """The committed results file a runs/ results file starts from: the same path under outputs/."""
    try:
        return COMMITTED / Path(results_path).relative_to(RUNS)
    except ValueError:
        return None


def copy_committed_runs(results: dict, results_path: Path, configs: list[TrainConfig]) -> int:
    """Add to `results` (saved at `results_path`, under runs/) the runs of
    `configs` that its committed twin holds and it does not; return how many.
    Each copied run carries where it came from: the twin's path and provenance."""
    twin = committed_twin(results_path)
    if twin is None or not twin.exists():
        return 0
    committed = load_results(twin)
    wanted = {run_key(config.to_dict()) for config in configs}
    have = {run_key(run["config"]) for run in results["runs"]}
    origin = {"file": str(twin), "environment": committed.get("environment", {})}
    copied = [{**run, "copied_from": origin} for run in committed["runs"] if run_key(run["config"]) in wanted - have]
    if copied:
        results["runs"].extend(copied)
        save_results(results_path, results)
    return len(copied)


def sweep_strategy(args: argparse.Namespace, num_devices: int = 1) -> Strategy | None:
    """The engine's choice for runs over `num_devices` devices, with
    --parallel-runs applied; None (the engine's choice) when it is not set.
    With --distributed, joins this process to the others first (before JAX
    starts a backend: studies call this before anything else touches JAX)."""
    if getattr(args, "distributed", False):
        jax.distributed.initialize()
    if args.parallel_runs is None:
        return None
    return dataclasses.replace(default_strategy(None, num_devices), parallel_runs=args.parallel_runs)


def varying_fields(configs: list[TrainConfig]) -> list[str]:
    """The TrainConfig fields whose value differs between `configs`, in field order."""
    return [field.name for field in dataclasses.fields(TrainConfig)
            if len({getattr(config, field.name) for config in configs}) > 1]


def describe(config: TrainConfig, fields: list[str]) -> str:
    shown = {name: getattr(config, name) for name in fields}
    if shown.get("bn") is not None:
        shown["bn"] = describe_bn(shown["bn"])
    return " ".join(f"{name}={value}" for name, value in shown.items()) or "run"


def importable(function):
    """`function`, as worker processes can unpickle it. A study run as
    `python -m experiments.<study>` defines its functions in `__main__`, which
    a worker cannot import by that name; the same function of the module
    imported by its own name (`experiments.<study>`) can be."""
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if function is None or getattr(function, "__module__", None) != "__main__" or main_spec is None:
        return function
    return getattr(importlib.import_module(main_spec.name), function.__qualname__)


class Eta:
    """The sweep's time left, learned from the steps done: the rate since the
    first report (which comes after compiling, so compile time does not
    inflate it), over the steps left."""

    def __init__(self, total_steps: int):
        self.total_steps, self.first = total_steps, None

    def update(self, steps_done: int, now: float) -> str:
        if self.first is None or steps_done <= self.first[0]:
            self.first = self.first or (steps_done, now)
            return "ETA: measuring"
        rate = (steps_done - self.first[0]) / (now - self.first[1])
        return f"ETA {(self.total_steps - steps_done) / rate / 60:.1f} min"


def progress_numbers(record: dict) -> str:
    """An evaluation's numbers under their History names, each kind of BN
    statistics named: val_accuracy is always the running averages'."""
    others = "".join(f" {key} {record[key]:.4f}" for key in ("precise_val_accuracy", "batch_val_accuracy")
                     if key in record)
    return f"val_accuracy {record['val_accuracy']:.4f} (running averages){others} train_loss {record['train_loss']:.4f}"


class SweepObserver(Observer):
    """A sweep's say in `train_many`: a progress line with the ETA after each
    evaluation, every finished run saved (with `measure`'s values), the runs
    saved already done. Runs are known by their config (a frozen, hashable
    value), the same for the configs given and those the engine reports."""

    def __init__(self, name: str, todo: list[TrainConfig], data, results_path: Path, results: dict, make_probe,
                 measure, fields: list[str], *, checkpoint_dir: Path | None = None):
        super().__init__(make_probe=importable(make_probe), checkpoint_dir=checkpoint_dir)
        self.name, self.data, self.results_path, self.results, self.measure = name, data, results_path, results, measure
        self.labels = {config: f"[{index}/{len(todo)}] {describe(config, fields)}" for index, config in enumerate(todo, 1)}
        self.steps_seen: dict[TrainConfig, int] = {}
        self.eta = Eta(sum(resolve_steps(config, len(data.x_train))[1] for config in todo))

    def is_done(self, config: TrainConfig) -> bool:
        return config not in self.labels

    def on_eval(self, config: TrainConfig, step: int, total_steps: int, record: dict) -> None:
        self.steps_seen[config] = step
        print(f"{self.name} {self.labels[config]} step {step}/{total_steps} {progress_numbers(record)} "
              f"| {self.eta.update(sum(self.steps_seen.values()), time.perf_counter())}", flush=True)

    def on_done(self, config: TrainConfig, history, state) -> None:
        if history.diverged:
            print(f"{self.name} {self.labels[config]} diverged (training loss {history.train_loss[-1]:.4g}) "
                  f"at step {history.steps[-1]}; recorded, going on", flush=True)
        self.steps_seen[config] = resolve_steps(config, len(self.data.x_train))[1]  # a diverged run's rest counts as done
        extra = self.measure(config, history, state, self.data) if self.measure is not None else None
        add_run(self.results_path, self.results, config, history, extra)
        if self.checkpoint_dir is not None:  # saved whole in the results: its checkpoint has done its job
            shutil.rmtree(checkpoint_file(self.checkpoint_dir, config), ignore_errors=True)


def run_sweep(
    configs: list[TrainConfig],
    results_path: Path,
    load_data: Callable[[], object],
    strategy: Strategy | None = None,
    make_probe=None,
    measure: Callable[[TrainConfig, object, object, object], dict] | None = None,
    name: str = "sweep",
    results: dict | None = None,
    *,
    tensorboard_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> dict:
    """Train the configs not yet saved in `results_path`; return all results.

    `load_data()` is called only if something is left to train. `make_probe`:
    see `bnjax.Observer`. `measure(config, history, state, data) ->
    dict`, if given, measures each finished run's final state; its values are
    saved beside the run's History. `results`: the file's contents, if the
    caller has read them already. `tensorboard_dir`: every run of `configs`
    also as TensorBoard event files there, one folder per run (`write_tensorboard`),
    those saved before included. `checkpoint_dir`: every run in progress
    saved there at each evaluation and resumed from there (`bnjax.Observer`)."""
    reason = unwritable_reason(results_path)
    if reason:  # before any training: its results could not be saved
        print(f"error: cannot save results to {results_path}: {reason} (choose another --out)", file=sys.stderr)
        raise SystemExit(2)
    results = load_results(results_path) if results is None else results
    copied = copy_committed_runs(results, results_path, configs)
    if copied:
        print(f"{name}: {copied} runs copied from {committed_twin(results_path)}", flush=True)
    todo = unfinished(results, configs)
    print(f"{name}: {len(configs)} runs; {len(configs) - len(todo)} already in {results_path}; "
          f"{len(todo)} to train", flush=True)
    if not todo:
        write_tensorboard_runs(tensorboard_dir, results, configs)
        return results
    use_persistent_cache()  # a second sweep here loads its programs instead of compiling them
    data = load_data()
    observer = SweepObserver(name, todo, data, results_path, results, make_probe, measure, varying_fields(configs),
                             checkpoint_dir=checkpoint_dir)
    start = time.perf_counter()
    print(f"{name}: compiling and training; the first line comes after each run's first evaluation", flush=True)
    # All configs, those not in `todo` done: the remaining runs train in the
    # groups and processes of the uninterrupted sweep, so they get its numbers.
    train_many(configs, data, strategy=strategy, observer=observer)
    print(f"{name}: {len(todo)} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    write_tensorboard_runs(tensorboard_dir, results, configs)
    return results


def write_tensorboard_runs(tensorboard_dir: Path | None, results: dict, configs: list[TrainConfig]) -> None:
    """The saved runs of `configs` as TensorBoard event files under
    `tensorboard_dir`, a folder per run named by the fields that tell the
    runs apart; a run whose folder exists is left as it is."""
    if tensorboard_dir is None:
        return
    fields, wanted = varying_fields(configs), set(configs)
    written = 0
    for run in results["runs"]:
        config = TrainConfig.from_dict(run["config"])
        folder = tensorboard_dir / (re.sub(r"[^\w.=-]+", "_", describe(config, fields)) or "run")
        if config in wanted and not folder.exists():
            history = History(**{field.name: run[field.name] for field in dataclasses.fields(History)
                                 if field.name in run})
            write_tensorboard(folder, config, history)
            written += 1
    print(f"TensorBoard: {written} runs written under {tensorboard_dir}: tensorboard --logdir {tensorboard_dir}",
          flush=True)


def run_folders(args: argparse.Namespace, part: str | None = None) -> dict:
    """`run_sweep`'s folders for a study's flags: tensorboard_dir
    (`tensorboard_folder`) and checkpoint_dir (<out>/checkpoints, /<part> for
    a study of several sweeps; None without --checkpoint)."""
    checkpoints = None
    if args.checkpoint:
        checkpoints = args.out / "checkpoints" / part if part else args.out / "checkpoints"
    return {"tensorboard_dir": tensorboard_folder(args, part), "checkpoint_dir": checkpoints}


def tensorboard_folder(args: argparse.Namespace, part: str | None = None) -> Path | None:
    """Where --tensorboard puts a study's TensorBoard runs: <out>/tensorboard
    (/<part>, for a study of several sweeps), or None without --tensorboard."""
    if not args.tensorboard:
        return None
    return args.out / "tensorboard" / part if part else args.out / "tensorboard"
