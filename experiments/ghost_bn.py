"""Synchronized vs. ghost BN under data parallelism.

    python -m experiments.ghost_bn [--epochs 1] [--seeds 2] [--out outputs/ghost_bn]

The article's BN net (lr 0.01, relu, global batch 32) trained over 8 devices
with synchronized BN (statistics of the global batch: the same model one device
trains) and with ghost BN (each device normalizes with its own slice: 16
examples on 2 devices, 4 on 8). On a machine without 8 accelerators the CPU is
split into 8 simulated devices (set before JAX starts). About 5 minutes on 2
CPU cores. Writes results.json, ghost_bn.png and summary.md to --out.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the CPU backend: 8 simulated devices when there is no accelerator.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.support.atomic import atomic_write  # noqa: E402
from bnjax.training.config import TrainConfig  # noqa: E402
from experiments.results import load_results, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, run_folders, run_sweep, sweep_strategy)  # noqa: E402

# (label, num_devices, ghost_bn)
VARIANTS = [
    ("synchronized BN, 8 devices", 8, False),
    ("ghost BN, 2 devices x 16 examples", 2, True),
    ("ghost BN, 8 devices x 4 examples", 8, True),
]


def variant_label(config: dict) -> str:
    return next(label for label, devices, ghost in VARIANTS
                if config["num_devices"] == devices and config["ghost_bn"] == ghost)


def plot(results_path: Path) -> None:
    runs = load_results(results_path)["runs"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    lines = ["| variant | final test accuracy (mean ± std) | final train loss | seeds |", "|---|---|---|---|"]
    for (label, _, _), color in zip(VARIANTS, ("tab:red", "tab:green", "tab:purple")):
        group = [run for run in runs if variant_label(run["config"]) == label]
        if not group:
            continue
        steps = np.array(group[0]["steps"]) / 1875
        val = np.array([run["val_accuracy"] for run in group])
        axes.plot(steps, val.mean(0), color=color, label=f"{label}: test (running averages)")
        if len(group) > 1:
            axes.fill_between(steps, val.min(0), val.max(0), color=color, alpha=0.2, linewidth=0)
        axes.plot(steps, np.mean([run["train_accuracy"] for run in group], 0), color=color, linestyle="--",
                  linewidth=1, label=f"{label}: training")
        finals = val[:, -1]
        lines.append(f"| {label} | {finals.mean():.4f} ± {finals.std():.4f} | "
                     f"{np.mean([run['train_loss'][-1] for run in group]):.4f} | {len(group)} |")
    axes.set_xlabel("epoch")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.8, 1.0)
    axes.grid(alpha=0.3)
    axes.set_title("BN net, Adam lr=0.01, relu, global batch 32")
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    save_figure(figure, results_path.parent / "ghost_bn.png", dpi=110)
    with atomic_write(results_path.parent / "summary.md", "w") as file:
        file.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="synchronized vs. ghost BN over devices")
    add_sweep_flags(parser, seeds=2, epochs=1, study="ghost_bn")
    args = parser.parse_args(argv)
    output_folder(args, "ghost_bn")
    if jax.device_count() < 8:
        parser.error(f"needs 8 devices, found {jax.device_count()} ({jax.default_backend()})")

    results_path = args.out / "results.json"
    configs = [
        TrainConfig(batch_norm=True, activation="relu", learning_rate=0.01, epochs=args.epochs,
                    max_steps=args.max_steps, seed=seed, num_devices=num_devices, ghost_bn=ghost_bn)
        for _, num_devices, ghost_bn in VARIANTS
        for seed in range(args.seeds)
    ]
    run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args, num_devices=8), name="ghost_bn",
              **run_folders(args))
    plot(results_path)
    print(f"wrote {args.out}/ghost_bn.png and summary.md", flush=True)


if __name__ == "__main__":
    run_resumable(main)
