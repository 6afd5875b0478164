"""The article's sweep: plain vs. BN CNN on MNIST, per (learning rate, activation).

    python -m experiments.article                  # article grid, 3 seeds, 3 epochs
    python -m experiments.article --grid notebook  # lr {0.001, 0.01, 0.05} x {relu, sigmoid}
    python -m experiments.article --seeds 1 --max-steps 200 --out /tmp/smoke  # smoke run
    python -m experiments.article --grid notebook --dataset fashion_mnist  # -> runs/article_fashion_mnist
    python -m experiments.article --no-precise-bn  # without the precise-BN curves (about half the time)

Writes `<out>/results.json` after every run (atomically), then the figures and
`summary.md` (see experiments/plot_article.py, which redraws them from the JSON
alone). Runs already in results.json are skipped, so an interrupted sweep
resumes where it stopped. The article grid's 18 runs on 2 CPU cores: their
training times add up to 133 minutes in the committed results, two runs at a
time (about an hour); 41 of those minutes are precise BN's evaluations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnjax.support.checks import OneLineArgumentParser
from bnjax.data.datasets import DATASETS, SOURCES, load_dataset
from bnjax.engine.strategy import default_strategy
from bnjax.support.provenance import describe_environment, environment, same_setup
from bnjax.training.config import TrainConfig
from experiments import plot_article
from experiments.results import load_results, run_key, run_resumable, unfinished
from experiments.sweep import (COMMITTED, RUNS, add_sweep_flags, copy_committed_runs, output_folder, run_folders,
                               run_sweep, sweep_strategy)

# (learning_rate, activation) pairs.
GRIDS = {
    "article": [(0.001, "sigmoid"), (0.01, "sigmoid"), (0.01, "relu")],
    "notebook": [(lr, activation) for lr in (0.001, 0.01, 0.05) for activation in ("relu", "sigmoid")],
}


def sweep_configs(grid: str, seeds: int, epochs: int, max_steps: int | None,
                  precise_bn: bool = True) -> list[TrainConfig]:
    """The grid's runs; with `precise_bn` (the default), every evaluation of a
    BN run also measures its weights with precise BN statistics
    (TrainConfig.eval_statistics): the running averages' swing and what
    removes it, side by side."""
    return [
        TrainConfig(batch_norm=batch_norm, activation=activation, learning_rate=learning_rate,
                    epochs=epochs, max_steps=max_steps, seed=seed,
                    eval_statistics="precise" if batch_norm and precise_bn else "running")
        for learning_rate, activation in GRIDS[grid]
        for batch_norm in (False, True)
        for seed in range(seeds)
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="article")
    add_sweep_flags(parser, seeds=3, epochs=3, study="article")
    parser.add_argument("--precise-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="also test every BN run's weights with precise BN statistics at each evaluation "
                             "(default: on)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="data source (see bnjax/data/datasets.py)")
    parser.add_argument("--data-dir", default=None, help="IDX directory or TFDS data_dir")
    parser.add_argument("--cache-dir", default=None, help="data cache directory (default $BNJAX_CACHE_DIR or ~/.cache/bnjax)")
    return parser.parse_args(argv)


def study_name(args: argparse.Namespace) -> str:
    """The folders' name: "article", or "article_fashion_mnist" for that data set."""
    return "article" if args.dataset == "mnist" else f"article_{args.dataset}"


def explain_nothing_trained(args: argparse.Namespace, results: dict, results_path: Path,
                            configs: list[TrainConfig]) -> None:
    """Every run is saved already (e.g. a fresh clone's committed results): say
    where they came from and how to train afresh, show the table, touch nothing."""
    # Runs copied from the committed results carry where they were made.
    saved = next((run["copied_from"]["environment"] for run in results["runs"] if "copied_from" in run),
                 results.get("environment", {}))
    here = environment()
    print(f"Nothing was trained. The saved runs were made on: {describe_environment(saved)}.")
    if not same_setup(saved, here):
        print(f"This machine differs: {describe_environment(here)}.")
    wanted = {run_key(config.to_dict()) for config in configs}
    # The table of exactly these runs (a results file may hold other grids' runs too).
    these = [run for run in results["runs"] if run_key(run["config"]) in wanted]
    print(f"\n{plot_article.summary_markdown(plot_article.group_runs(these), args.dataset).strip()}\n")
    summary = args.out / "summary.md"
    if not summary.exists():  # a fresh runs/ folder: the committed figures of these runs
        summary = COMMITTED / study_name(args) / "summary.md"
    run_minutes = sum(run.get("total_wall_time_s", 0.0) for run in results["runs"]
                      if run_key(run["config"]) in wanted) / 60
    options = argv_without_out(args)
    # A folder of this invocation's own, so that a smoke run's suggestion never points into the full sweep's.
    folder = f"{RUNS / study_name(args)}-" + ("-".join(word.lstrip("-") for word in options) or "afresh")
    fresh = " ".join(["python -m experiments.article", *options, "--out", folder])
    print(f"The figures and summary in {summary.parent}/ are left as they were "
          f"(python -m experiments.plot_article {results_path} redraws them).")
    at_once = args.parallel_runs or default_strategy("cpu").parallel_runs
    print(f"To train these {len(configs)} runs afresh here: {fresh}  "
          f"(the saved runs' training times add up to {run_minutes:.0f} minutes where they were made; "
          f"{at_once} at a time, as the engine trains them on this machine's CPU cores: "
          f"about {run_minutes / at_once:.0f} minutes).")


def argv_without_out(args: argparse.Namespace) -> list[str]:
    """The sweep-defining options of this invocation that differ from their defaults, as words."""
    defaults = parse_args([])
    words = []
    for name in ("grid", "seeds", "epochs", "max_steps", "dataset"):
        if getattr(args, name) != getattr(defaults, name):
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return words + ([] if args.precise_bn else ["--no-precise-bn"])


def main(argv=None) -> None:
    args = parse_args(argv)
    output_folder(args, study_name(args))
    configs = sweep_configs(args.grid, args.seeds, args.epochs, args.max_steps, args.precise_bn)
    results_path = args.out / "results.json"
    results = load_results(results_path)
    copy_committed_runs(results, results_path, configs)  # under runs/: the committed runs of these configs
    saved_dataset = results.setdefault("dataset", args.dataset)
    if saved_dataset != args.dataset:
        sys.exit(f"error: {results_path} holds {saved_dataset} runs, not {args.dataset}; pass another --out")
    if not unfinished(results, configs):
        print(f"{len(configs)} runs in the {args.grid} grid; {len(configs)} already in {results_path}; 0 to train",
              flush=True)
        explain_nothing_trained(args, results, results_path, configs)
        return

    def load_data():
        try:
            return load_dataset(args.dataset, args.source, args.data_dir, args.cache_dir)
        except ValueError as error:  # e.g. a source that does not have this data set
            sys.exit(f"error: {error}")

    # The engine picks the launch strategy for this backend (bnjax/engine/strategy.py):
    # on CPU one run per core side by side, in worker processes; on GPU/TPU
    # many runs per vmapped program.
    run_sweep(configs, results_path, load_data, strategy=sweep_strategy(args), name=f"{args.grid} grid",
              results=results,
              **run_folders(args))
    plot_article.plot_all(results_path)


if __name__ == "__main__":
    run_resumable(main)
