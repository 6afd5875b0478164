"""Many runs at once: one vmapped program for a stack of runs vs. one program per run.

    python -m benchmarks.stacked_runs                       # 30 runs (article grid x 5 seeds), 3 epochs
    python -m benchmarks.stacked_runs --seeds 2 --epochs 1  # smaller
    python -m benchmarks.stacked_runs --json

Trains the same configs through `train_many` under several launch strategies
(bnjax/engine/launch.py) and prints the wall time of each, end to end (compilation,
evaluation every 100 steps and all). Strategies that only change how runs are
launched compute the same Histories within round-off (tests/test_engine.py),
so the final mean test accuracy is printed beside each as a check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax

from bnjax.data.datasets import load_mnist
from bnjax.engine.launch import train_many
from bnjax.engine.strategy import Strategy, default_strategy
from bnjax.support.provenance import environment
from experiments.article import sweep_configs
from experiments.sweep import positive_int


def strategies(platform: str) -> dict[str, Strategy]:
    default = default_strategy(platform)
    one_process = dataclasses.replace(default, parallel_runs=1)
    return {
        "default": default,
        "one run per program": dataclasses.replace(one_process, models_per_program=1),
        "one run per program, 1 step per dispatch": dataclasses.replace(one_process, models_per_program=1,
                                                                         steps_per_dispatch=1),
    }


def measure(seeds: int, epochs: int, only: list[str] | None) -> dict:
    data = load_mnist()
    device = jax.devices()[0]
    configs = sweep_configs("article", seeds=seeds, epochs=epochs, max_steps=None)
    result = {"device": f"{device.device_kind} ({device.platform})", "jax": jax.__version__,
              "runs": len(configs), "epochs": epochs, "strategies": {}}
    for name, strategy in strategies(device.platform).items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        outcomes = train_many(configs, data, strategy=strategy)
        seconds = time.perf_counter() - start
        result["strategies"][name] = {
            "strategy": dataclasses.asdict(strategy), "seconds": seconds,
            "points_per_curve": len(outcomes[0][0].steps),
            "mean_final_val_accuracy": statistics.mean(history.val_accuracy[-1] for history, _ in outcomes),
        }
        print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=positive_int, default=5, help="seeds per article setting (6 settings; default 5 = 30 runs)")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--only", action="append", help="time only this strategy (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    known = list(strategies(jax.default_backend()))
    for name in args.only or []:
        if name not in known:
            parser.error(f"--only {name!r} is not a strategy here; one of {known}")
    result = measure(args.seeds, args.epochs, args.only)
    if args.json:
        result["environment"] = environment()  # versions, device, CPU and the bnjax commit
        json.dump(result, sys.stdout, indent=1)
        print()
        return
    print(f"{result['runs']} runs x {result['epochs']} epochs on {result['device']}, jax {result['jax']}")
    for name, figures in result["strategies"].items():
        print(f"  {name:42s} {figures['seconds']:7.1f} s  ({figures['points_per_curve']} points per curve, "
              f"mean final val_accuracy {figures['mean_final_val_accuracy']:.4f})")


if __name__ == "__main__":
    main()
