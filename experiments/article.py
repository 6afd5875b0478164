"""The article's sweep: plain vs. BN CNN on MNIST, per (learning rate, activation).

    python -m experiments.article                  # article grid, 3 seeds, 3 epochs
    python -m experiments.article --grid notebook  # lr {0.001, 0.01, 0.05} x {relu, sigmoid}
    python -m experiments.article --seeds 1 --max-steps 200 --out /tmp/smoke  # smoke run
    python -m experiments.article --grid notebook --dataset fashion_mnist  # -> outputs/article_fashion_mnist

Writes `<out>/results.json` after every run (atomically), then the figures and
`summary.md` (see experiments/plot_article.py, which redraws them from the JSON
alone). Runs already in results.json are skipped, so an interrupted sweep
resumes where it stopped. Full article grid on 2 CPU cores: about 25 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from bnjax.data import DATASETS, SOURCES, load_dataset
from bnjax.engine import default_strategy, train_many
from bnjax.provenance import describe_environment, environment, same_setup
from bnjax.train import TrainConfig, resolve_steps
from experiments import plot_article
from experiments.results import add_run, load_results, run_key, run_resumable, unfinished

# (learning_rate, activation) pairs.
GRIDS = {
    "article": [(0.001, "sigmoid"), (0.01, "sigmoid"), (0.01, "relu")],
    "notebook": [(lr, activation) for lr in (0.001, 0.01, 0.05) for activation in ("relu", "sigmoid")],
}


def sweep_configs(grid: str, seeds: int, epochs: int, max_steps: int | None) -> list[TrainConfig]:
    return [
        TrainConfig(batch_norm=batch_norm, activation=activation, learning_rate=learning_rate,
                    epochs=epochs, max_steps=max_steps, seed=seed)
        for learning_rate, activation in GRIDS[grid]
        for batch_norm in (False, True)
        for seed in range(seeds)
    ]


def describe(config: TrainConfig) -> str:
    return f"{'BN   ' if config.batch_norm else 'plain'} {config.activation:7s} lr={config.learning_rate:g} seed={config.seed}"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="article")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per configuration (default 3)")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per run (smoke runs)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default outputs/article, or outputs/article_<dataset> for other data sets)")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="data source (see bnjax/data.py)")
    parser.add_argument("--data-dir", default=None, help="IDX directory or TFDS data_dir")
    parser.add_argument("--cache-dir", default=None, help="data cache directory (default $BNJAX_CACHE_DIR or ~/.cache/bnjax)")
    parser.add_argument("--parallel-runs", type=positive_int, default=None,
                        help="runs trained side by side, one CPU core each (default: the engine's choice, "
                             "all cores on CPU); 1 = one run at a time in this process")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("outputs/article" if args.dataset == "mnist" else f"outputs/article_{args.dataset}")
    return args


def explain_nothing_trained(args: argparse.Namespace, results: dict, results_path: Path,
                            configs: list[TrainConfig]) -> None:
    """Every run is saved already (e.g. a fresh clone's committed results): say
    where they came from and how to train afresh, show the table, touch nothing."""
    saved, here = results.get("environment", {}), environment()
    print(f"Nothing was trained. The saved runs were made on: {describe_environment(saved)}.")
    if not same_setup(saved, here):
        print(f"This machine differs: {describe_environment(here)}.")
    summary = args.out / "summary.md"
    if summary.exists():
        print(f"\n{summary.read_text().strip()}\n")
    wanted = {run_key(dataclasses.asdict(config)) for config in configs}
    run_minutes = sum(run.get("total_wall_time_s", 0.0) for run in results["runs"]
                      if run_key(run["config"]) in wanted) / 60
    fresh = " ".join(["python -m experiments.article", *argv_without_out(args), "--out", "runs/article"])
    print(f"The figures and summary in {args.out}/ are left as they were "
          f"(python -m experiments.plot_article {results_path} redraws them).")
    print(f"To train these {len(configs)} runs afresh here: {fresh}  "
          f"(the saved runs' training times add up to {run_minutes:.0f} minutes "
          f"where they were made).")


def argv_without_out(args: argparse.Namespace) -> list[str]:
    """The sweep-defining options of this invocation that differ from their defaults, as words."""
    defaults = parse_args([])
    words = []
    for name in ("grid", "seeds", "epochs", "max_steps", "dataset"):
        if getattr(args, name) != getattr(defaults, name):
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return words


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = sweep_configs(args.grid, args.seeds, args.epochs, args.max_steps)
    results_path = args.out / "results.json"
    results = load_results(results_path)
    saved_dataset = results.setdefault("dataset", args.dataset)
    if saved_dataset != args.dataset:
        sys.exit(f"error: {results_path} holds {saved_dataset} runs, not {args.dataset}; pass another --out")
    todo = unfinished(results, configs)
    print(f"{len(configs)} runs in the {args.grid} grid; {len(configs) - len(todo)} already in {results_path}; "
          f"{len(todo)} to train", flush=True)

    if not todo:
        explain_nothing_trained(args, results, results_path, configs)
        return
    try:
        data = load_dataset(args.dataset, args.source, args.data_dir, args.cache_dir)
    except ValueError as error:  # e.g. a source that does not have this data set
        sys.exit(f"error: {error}")
    total_steps = sum(resolve_steps(config, len(data.x_train))[1] for config in todo)
    sweep_start = time.perf_counter()
    labels = {id(config): f"[{index}/{len(todo)}] {describe(config)}" for index, config in enumerate(todo, 1)}
    steps_seen: dict[int, int] = {}

    def show_progress(config, step, run_steps, record):
        steps_seen[id(config)] = step
        elapsed = time.perf_counter() - sweep_start
        done = sum(steps_seen.values())
        eta_s = (total_steps - done) * elapsed / done
        print(f"{labels[id(config)]} step {step}/{run_steps} val_acc {record['val_accuracy']:.4f} "
              f"train_loss {record['train_loss']:.4f} | sweep ETA {eta_s / 60:.1f} min", flush=True)

    def save_run(config, history, state):
        if history.diverged:
            print(f"{labels[id(config)]} diverged (non-finite loss) at step {history.steps[-1]}; recorded, "
                  "going on", flush=True)
        add_run(results_path, results, config, history)

    # The engine picks the launch strategy for this backend (bnjax/engine.py):
    # on CPU one run per core side by side, in worker processes; on GPU/TPU
    # many runs per vmapped program.
    strategy = default_strategy()
    if args.parallel_runs is not None:
        strategy = dataclasses.replace(strategy, parallel_runs=args.parallel_runs)
    train_many(todo, data, strategy=strategy, on_eval=show_progress, on_done=save_run)
    print(f"sweep done: {len(todo)} runs in {(time.perf_counter() - sweep_start) / 60:.1f} min", flush=True)

    plot_article.plot_all(results_path)


if __name__ == "__main__":
    run_resumable(main)
