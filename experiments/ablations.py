"""The article's keypoints, tested with seeds: each study trains the article's
CNN for one epoch (Adam, batch 32 unless varied) and saves every run.

    python -m experiments.ablations position   # BN before vs. after the activation
    python -m experiments.ablations bias       # use_bias on vs. off under BN
    python -m experiments.ablations lr_grid    # lr x activation heatmap, BN vs. plain
    python -m experiments.ablations batch_size # BN vs. plain at batch 2 ... 256, same examples seen
    python -m experiments.ablations all        # the four, in that order
    options: --seeds N (default 3)  --out DIR (default outputs/ablations)  --max-steps N (smoke runs)

Each study writes `<out>/<study>/results.json` after every run (resumable),
then its figure and `summary.md`. Wall time on 2 CPU cores, 3 seeds:
position ~5 min, bias ~3 min, lr_grid ~55 min (7 learning rates x 4
activations x 2 nets x 20 s), batch_size ~25 min (`--examples` sets the
examples seen per run; default one epoch, 60,000).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.support.atomic import atomic_write  # noqa: E402
from bnjax.training.config import TrainConfig
from bnjax.training.steps import cross_entropy_loss, to_float_images  # noqa: E402
from experiments.plot_article import seeds_phrase  # noqa: E402
from experiments.results import last_full_interval, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, positive_int, run_folders, run_sweep,  # noqa: E402
                               sweep_strategy)

ACTIVATIONS = ("sigmoid", "tanh", "relu", "elu")
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # a half-decade log grid
BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
MNIST_TRAIN_SIZE = 60000


def one_epoch(**fields) -> TrainConfig:
    """The article's recipe for one epoch, evaluated 5 times (every 375 steps)."""
    return TrainConfig(epochs=1, eval_every=375, **fields)


def position_configs(seeds: int) -> list[TrainConfig]:
    # "after": layer (+bias, which is not redundant there: the activation comes
    # between it and BN) -> activation -> BN. "before": the article's net.
    return [one_epoch(batch_norm=True, activation=activation, learning_rate=0.01, bn_position=position,
                      bn_use_bias=position == "after", seed=seed)
            for activation in ("relu", "sigmoid") for position in ("before", "after") for seed in range(seeds)]


def bias_configs(seeds: int) -> list[TrainConfig]:
    return [one_epoch(batch_norm=True, activation=activation, learning_rate=0.01, bn_use_bias=use_bias, seed=seed)
            for activation in ("relu", "sigmoid") for use_bias in (False, True) for seed in range(seeds)]


def lr_grid_configs(seeds: int) -> list[TrainConfig]:
    # Evaluated once, at the end: the heatmap shows final accuracy only.
    return [TrainConfig(epochs=1, eval_every=MNIST_TRAIN_SIZE, batch_norm=batch_norm, activation=activation,
                        learning_rate=learning_rate, seed=seed)
            for seed in range(seeds) for activation in ACTIVATIONS for learning_rate in LEARNING_RATES
            for batch_norm in (False, True)]


def batch_size_configs(seeds: int, examples: int = MNIST_TRAIN_SIZE) -> list[TrainConfig]:
    configs = []
    for seed in range(seeds):
        for batch_size in BATCH_SIZES:
            steps = examples // batch_size
            for batch_norm in (False, True):
                configs.append(TrainConfig(batch_norm=batch_norm, activation="relu", learning_rate=0.001,
                                           batch_size=batch_size, epochs=1, steps_per_epoch=steps,
                                           eval_every=max(1, steps // 4), seed=seed))
    return configs


def bias_gradients(config: TrainConfig, state, data) -> dict:
    """Largest |gradient| of the loss w.r.t. the Conv/Dense biases and kernels
    of the final state, on the first training batch; and the largest |bias|."""
    images = to_float_images(jnp.asarray(data.x_train[: config.batch_size]))
    labels = jnp.asarray(data.y_train[: config.batch_size])

    def loss(params):
        logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                   mutable=["batch_stats"])
        return cross_entropy_loss(logits, labels)

    grads = jax.grad(loss)(state.params)
    layers = [name for name in grads if not name.startswith("BatchNorm")]
    largest = lambda tree, kind: max(float(jnp.abs(tree[name][kind]).max()) for name in layers)  # noqa: E731
    return {"bias_grad_max": largest(grads, "bias"), "kernel_grad_max": largest(grads, "kernel"),
            "bias_abs_max": largest(state.params, "bias")}


# ---------------------------------------------------------------- figures and summaries

def final(run: dict) -> float:
    return run["val_accuracy"][-1]


def select(runs: list[dict], **fields) -> list[dict]:
    return [run for run in runs if all(run["config"][key] == value for key, value in fields.items())]


def mean_std(runs: list[dict]) -> str:
    values = np.array([final(run) for run in runs])
    return f"{values.mean():.4f} ± {values.std():.4f} (n={len(values)})" if len(values) else "—"


def curve_panel(axes, runs: list[dict], label: str, color: str) -> None:
    steps = np.array(runs[0]["steps"])
    values = np.array([run["val_accuracy"] for run in runs])
    axes.plot(steps, values.mean(0), color=color, label=f"{label} (mean of {len(runs)})")
    axes.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, linewidth=0)


def save_tight_figure(figure, path: Path) -> None:
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


def two_variant_study(runs: list[dict], field: str, variants: dict, title: str, out: Path, extra_columns=()) -> str:
    """Curves (relu | sigmoid panels) and a table for a study of two variants of `field`."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    lines = [f"| activation | {' | '.join(variants.values())} |" + "".join(f" {c} |" for c, _ in extra_columns),
             "|---" * (1 + len(variants) + len(extra_columns)) + "|"]
    for panel, activation in zip(axes, ("relu", "sigmoid")):
        cells = []
        for (value, name), color in zip(variants.items(), ("tab:red", "tab:orange")):
            group = select(runs, activation=activation, **{field: value})
            if group:
                curve_panel(panel, group, name, color)
            cells.append(mean_std(group))
        for _, column in extra_columns:
            cells.append(column(select(runs, activation=activation)))
        lines.append(f"| {activation} | " + " | ".join(cells) + " |")
        panel.set_title(f"BN net, {activation}, Adam lr 0.01", fontsize=10)
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("test accuracy (band: min-max over seeds)")
    figure.suptitle(title)
    save_tight_figure(figure, out / f"{out.name}.png")
    return "\n".join(lines)


def summarize_position(runs: list[dict], out: Path) -> str:
    table = two_variant_study(runs, "bn_position", {"before": "BN before activation (no bias)",
                                                    "after": "BN after activation (+bias)"},
                              "BN before vs. after the activation (1 epoch)", out)
    return "Final test accuracy after one epoch, mean ± std over seeds.\n\n" + table


def summarize_bias(runs: list[dict], out: Path) -> str:
    def gradient_column(group):
        with_bias = [run for run in group if run["config"]["bn_use_bias"]]
        return (f"{max(run['bias_grad_max'] for run in with_bias):.1e} / "
                f"{min(run['kernel_grad_max'] for run in with_bias):.1e}") if with_bias else "—"

    def drift_column(group):
        with_bias = [run for run in group if run["config"]["bn_use_bias"]]
        return f"{max(run['bias_abs_max'] for run in with_bias):.2e}" if with_bias else "—"

    table = two_variant_study(
        runs, "bn_use_bias", {False: "no bias (article)", True: "with bias"},
        "use_bias under BN (bias right before BN; 1 epoch)", out,
        extra_columns=[("largest bias gradient / smallest largest-kernel gradient (final state)", gradient_column),
                       ("largest final |bias| (init 0)", drift_column)])
    return ("Final test accuracy after one epoch, mean ± std over seeds. Gradients: of the loss on one training "
            "batch at the final state, max over layers and seeds.\n\n" + table)


def complete_seeds(runs: list[dict], grid_size: int) -> list[dict]:
    """The runs of the seeds that cover the whole grid (an interrupted study
    leaves its last seed partial, which would give cells unequal weight)."""
    by_seed: dict[int, list[dict]] = {}
    for run in runs:
        by_seed.setdefault(run["config"]["seed"], []).append(run)
    return [run for seed_runs in by_seed.values() if len(seed_runs) == grid_size for run in seed_runs]


def summarize_lr_grid(runs: list[dict], out: Path) -> str:
    partial = len(runs)
    runs = complete_seeds(runs, len(LEARNING_RATES) * len(ACTIVATIONS) * 2)
    if not runs:
        raise SystemExit(f"error: no seed of the lr grid is complete yet ({partial} runs saved)")
    learning_rates = sorted({run["config"]["learning_rate"] for run in runs})
    figure, axes = plt.subplots(1, 3, figsize=(16, 3.9))
    grids = {}
    for batch_norm in (False, True):
        grid = np.full((len(ACTIVATIONS), len(learning_rates)), np.nan)
        for i, activation in enumerate(ACTIVATIONS):
            for j, learning_rate in enumerate(learning_rates):
                group = select(runs, batch_norm=batch_norm, activation=activation, learning_rate=learning_rate)
                if group:
                    grid[i, j] = np.mean([final(run) for run in group])
        grids[batch_norm] = grid
    panels = [(grids[False], "plain", "viridis", (0, 1)), (grids[True], "BN", "viridis", (0, 1)),
              (grids[True] - grids[False], "BN - plain", "RdBu", (-1, 1))]
    for panel, (grid, title, colormap, limits) in zip(axes, panels):
        image = panel.imshow(grid, cmap=colormap, vmin=limits[0], vmax=limits[1], aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                panel.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                           color="white" if title != "BN - plain" and grid[i, j] < 0.5 else "black")
        panel.set_xticks(range(len(learning_rates)), [f"{lr:g}" for lr in learning_rates], fontsize=8)
        panel.set_yticks(range(len(ACTIVATIONS)), ACTIVATIONS)
        panel.set_xlabel("Adam learning rate")
        panel.set_title(title)
        figure.colorbar(image, ax=panel)
    seeds = len({run["config"]["seed"] for run in runs})
    figure.suptitle(f"Final test accuracy after one epoch (mean of {seeds_phrase(seeds)})")
    save_tight_figure(figure, out / "lr_grid.png")
    lines = [f"Final test accuracy after one epoch, plain / BN, mean over {seeds_phrase(seeds)} "
             f"(std in results.json; {partial - len(runs)} runs of an incomplete seed left out).", "",
             "| activation | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " |",
             "|---" * (1 + len(learning_rates)) + "|"]
    for i, activation in enumerate(ACTIVATIONS):
        lines.append(f"| {activation} | " + " | ".join(f"{grids[False][i, j]:.3f} / {grids[True][i, j]:.3f}"
                                                     for j in range(len(learning_rates))) + " |")
    return "\n".join(lines)


def summarize_batch_size(runs: list[dict], out: Path) -> str:
    sizes = sorted({run["config"]["batch_size"] for run in runs})
    figure, axes = plt.subplots(figsize=(7, 4))
    lines = ["| batch size | steps | plain | BN | BN training accuracy (train mode, last interval) |", "|---|---|---|---|---|"]
    for batch_norm, color in ((False, "tab:blue"), (True, "tab:red")):
        values = [np.array([final(run) for run in select(runs, batch_norm=batch_norm, batch_size=size)])
                  for size in sizes]
        axes.plot(sizes, [v.mean() for v in values], "o-", color=color, label="BN" if batch_norm else "plain")
        axes.fill_between(sizes, [v.min() for v in values], [v.max() for v in values], color=color, alpha=0.2,
                          linewidth=0)
    for size in sizes:
        group = select(runs, batch_size=size)
        bn_train = np.mean([last_full_interval(run, "train_accuracy") for run in select(group, batch_norm=True)])
        lines.append(f"| {size} | {group[0]['steps'][-1]} | {mean_std(select(group, batch_norm=False))} | "
                     f"{mean_std(select(group, batch_norm=True))} | {bn_train:.4f} |")
    examples = max(run["steps"][-1] * run["config"]["batch_size"] for run in runs)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size (BN statistics over this many examples)")
    axes.set_ylabel("final test accuracy (band: min-max)")
    axes.set_title(f"relu, Adam lr 0.001, {examples} training examples seen", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    save_tight_figure(figure, out / "batch_size.png")
    return (f"Final test accuracy after {examples} training examples (one pass, fixed order), mean ± std over "
            "seeds (eval mode: running averages). The learning rate is not scaled with the batch size. Last "
            "column: mean training accuracy over the last full evaluation interval, in train mode (batch "
            "statistics), mean over seeds.\n\n" + "\n".join(lines))


# ---------------------------------------------------------------- running

STUDIES = {
    # name: (configs(seeds, args), summarize(runs, out), measure final state?)
    "position": (lambda args: position_configs(args.seeds), summarize_position, False),
    "bias": (lambda args: bias_configs(args.seeds), summarize_bias, True),
    "lr_grid": (lambda args: lr_grid_configs(args.seeds), summarize_lr_grid, False),
    "batch_size": (lambda args: batch_size_configs(args.seeds, args.examples), summarize_batch_size, False),
}


def measure_bias(config: TrainConfig, history, state, data) -> dict | None:
    """The bias study's measurement of a finished run that keeps its biases."""
    return bias_gradients(config, state, data) if config.bn_use_bias else None


def run_study(name: str, args, load_data) -> None:
    make_configs, summarize, measure_state = STUDIES[name]
    out = args.out / name
    results_path = out / "results.json"
    configs = [dataclasses.replace(config, max_steps=args.max_steps) for config in make_configs(args)]
    results = run_sweep(configs, results_path, load_data, strategy=sweep_strategy(args),
                        measure=measure_bias if measure_state else None, name=name,
                        **run_folders(args, name))
    summary = summarize(results["runs"], out)
    with atomic_write(out / "summary.md", "w") as file:
        file.write(summary + "\n")
    print(f"wrote {out}/{name}.png and summary.md", flush=True)


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="the article's keypoints, tested")
    parser.add_argument("study", choices=[*STUDIES, "all"])
    parser.add_argument("--examples", type=positive_int, default=MNIST_TRAIN_SIZE,
                        help="training examples per run of the batch_size study (default one epoch)")
    add_sweep_flags(parser, seeds=3, epochs=None, study="ablations")
    args = parser.parse_args(argv)
    if args.examples < max(BATCH_SIZES) or args.examples > MNIST_TRAIN_SIZE:
        parser.error(f"--examples {args.examples} must be in [{max(BATCH_SIZES)}, {MNIST_TRAIN_SIZE}]")
    output_folder(args, "ablations")
    load_data = functools.cache(load_mnist)  # one load for all studies of `all`
    for name in (STUDIES if args.study == "all" else [args.study]):
        run_study(name, args, load_data)


if __name__ == "__main__":
    run_resumable(main)
