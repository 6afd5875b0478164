"""Wu & Johnson's "Rethinking 'Batch' in BatchNorm" (2021) at MNIST scale.

    python -m experiments.rethinking_batch rules       # (a) running-average rules vs. precise BN
    python -m experiments.rethinking_batch samples     # (b) how many examples precise BN needs
    python -m experiments.rethinking_batch norm_batch  # (c) normalization batch size, train-test inconsistency
    python -m experiments.rethinking_batch renorm      # (d) Batch Renorm vs. BN at batch 2, 4, 8
    python -m experiments.rethinking_batch shift       # (e) domain shift: whose statistics to test with
    python -m experiments.rethinking_batch all         # the five, one after the other

Each part trains the article's BN net through the sweep driver (resumable,
seeds, worker processes), measures each finished run, and writes
`results.json`, a figure and `summary.md` to `<out>/<part>/` (default
outputs/rethinking_batch). `--size cpu` (the default, the committed results)
is sized to 2 CPU cores; `--size full` runs every part at the size it was cut
down from (`SIZES`). The wall time of each part is printed at its end and
recorded in its summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402  (a dependency of jax)

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.bn.batchnorm import RUNNING_AVERAGES, Renorm  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.support.atomic import atomic_write  # noqa: E402
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import batch_statistics_accuracy  # noqa: E402
from bnjax.training.evaluation import evaluate  # noqa: E402
from bnjax.training.precise_bn import recompute_batch_stats  # noqa: E402
from experiments.results import (  # noqa: E402
    last_full_interval, last_full_interval_index, load_results, run_resumable, save_figure)
from experiments.sweep import (add_sweep_flags, output_folder, run_folders, run_sweep, sweep_strategy)  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Size:
    rule_steps: int        # (a) steps per run (sigmoid, batch 32)
    rule_eval_every: int
    epochs: int            # (b), (e): epochs of the article's BN net
    norm_batch: int        # (c) the batch the optimizer steps with
    norm_steps: int
    norm_sizes: tuple      # (c) normalization batch sizes
    renorm_examples: int   # (d) training examples at each batch size


SIZES = {
    # 2 CPU cores: (a) a third of an epoch, (b) and (e) one epoch, (c) batch
    # 256 for 2 epochs, (d) a third of an epoch.
    "cpu": Size(rule_steps=600, rule_eval_every=50, epochs=1, norm_batch=256, norm_steps=468,
                norm_sizes=(2, 4, 8, 16, 32, 64, 256), renorm_examples=20000),
    # The article's 3 epochs, batch 1024 with normalization batches up to
    # 1024 (the paper's range of NBS), a whole epoch at batch 2, 4, 8.
    "full": Size(rule_steps=5625, rule_eval_every=100, epochs=3, norm_batch=1024, norm_steps=174,
                 norm_sizes=(2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), renorm_examples=60000),
}
PRECISE_BATCHES = 200  # precise BN's batches of 32 (6400 training examples), as the article sweep's
# Population statistics for tests at other batch sizes (parts c, d): 40 batches
# of 256 (10,240 training examples) with the ghost batches taken out.
POPULATION_BATCH, POPULATION_BATCHES = 256, 40


def population_accuracy(state, data, images=None, labels=None) -> float:
    """Test accuracy with population statistics estimated from the training set."""
    stats = recompute_batch_stats(state, data.x_train, POPULATION_BATCH, POPULATION_BATCHES)
    images = data.x_test if images is None else images
    labels = data.y_test if labels is None else labels
    return evaluate(state.replace(batch_stats=stats), images, labels)["accuracy"]


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {values.std():.4f}"


# ------------------------------------------------------------------ (a) rules
# Sigmoid, where the running averages fail (outputs/article); the test set
# every 50 steps of a third of an epoch (SIZES). Train mode never reads the
# running statistics, so for one lr and seed every rule and momentum trains the
# same weights (the summary checks it on the losses): one run per lr and seed
# also measures precise BN, whose curve is then every rule's reference.
def rules_configs(seeds: int, size: Size = SIZES["cpu"]) -> list[TrainConfig]:
    settings = ([(lr, rule, 0.99) for lr in (0.001, 0.01) for rule in RUNNING_AVERAGES]
                + [(0.01, rule, momentum) for momentum in (0.9, 0.999) for rule in ("ema", "debiased_ema")])
    return [TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=lr, bn=keras_bn(momentum=momentum, running_average=rule),
                        max_steps=size.rule_steps, eval_every=size.rule_eval_every, seed=seed,
                        eval_statistics="precise" if (rule, momentum) == ("ema", 0.99) else "running",
                        precise_bn_batches=PRECISE_BATCHES)
            for lr, rule, momentum in settings for seed in range(seeds)]


def rule_label(config: dict) -> str:
    if config["bn"]["running_average"] == "cumulative":
        return "cumulative"
    return f"{config['bn']['running_average']} {config['bn']['momentum']:g}"


def startup_lag(steps, running, precise, within: float = 0.05):
    """The first evaluation step at which the running averages' accuracy
    comes within `within` of precise BN's (None: never in this run)."""
    close = np.abs(np.asarray(running) - np.asarray(precise)) <= within
    return steps[int(np.argmax(close))] if close.any() else None


def summarize_rules(runs: list[dict], out: Path) -> str:
    precise = {(run["config"]["learning_rate"], run["config"]["seed"]): run for run in runs
               if run["config"]["eval_statistics"] == "precise"}
    settings = sorted({(run["config"]["learning_rate"], rule_label(run["config"])) for run in runs},
                      key=lambda setting: (setting[0], setting[1]))
    steps_run, every = runs[0]["steps"][-1], runs[0]["config"]["eval_every"]
    last = steps_run // 2 // every  # evaluations in the second half of the run
    lines = [f"BN net, sigmoid, Adam, batch 32, {steps_run} steps, test set every {every} steps; "
             f"precise BN: {PRECISE_BATCHES} training batches of 32 for the current weights (measured in the "
             "'ema 0.99' runs; every rule trains the same weights). Swing: max - min over the second half's "
             f"{last} evaluations; gap: mean over all evaluations of precise - running; start-up: first step at "
             "which running comes within 0.05 of precise, per seed. Mean ± std over seeds.", "",
             "| lr | rule | seeds | running, final | precise, final | swing | precise swing | gap | start-up (steps) "
             "| max train-loss difference to 'ema 0.99' |", "|---" * 10 + "|"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colors = {"ema": "tab:red", "debiased_ema": "tab:blue", "cumulative": "tab:green"}
    styles = {0.9: ":", 0.99: "-", 0.999: "--"}
    for lr, name in settings:
        group = [run for run in runs if run["config"]["learning_rate"] == lr and rule_label(run["config"]) == name]
        references = [precise[(lr, run["config"]["seed"])] for run in group]
        steps = np.array(group[0]["steps"])
        running = np.array([run["val_accuracy"] for run in group])
        precise_curves = np.array([reference["precise_val_accuracy"] for reference in references])
        lags = [startup_lag(steps, run_curve, precise_curve) for run_curve, precise_curve in zip(running, precise_curves)]
        loss_difference = max(float(np.max(np.abs(np.array(run["train_loss"]) - np.array(reference["train_loss"]))))
                               for run, reference in zip(group, references))
        tail, precise_tail = running[:, -last:], precise_curves[:, -last:]
        lines.append(
            f"| {lr:g} | {name} | {len(group)} | {mean_std(running[:, -1])} | {mean_std(precise_curves[:, -1])} | "
            f"{np.mean(tail.max(1) - tail.min(1)):.4f} | {np.mean(precise_tail.max(1) - precise_tail.min(1)):.4f} | "
            f"{np.mean(precise_curves - running):.4f} | {', '.join('never' if lag is None else str(lag) for lag in lags)} "
            f"| {loss_difference:.2g} |")
        rule, momentum = group[0]["config"]["bn"]["running_average"], group[0]["config"]["bn"]["momentum"]
        if rule == "cumulative" or momentum == 0.99:
            rule_panel = axes[0] if lr == 0.001 else axes[1]
            rule_panel.plot(steps, running.mean(0), color=colors[rule], label=f"running: {name}")
        if lr == 0.01 and rule != "cumulative":
            axes[2].plot(steps, running.mean(0), color=colors[rule], linestyle=styles[momentum],
                         label=f"running: {name}")
    for lr, panel in ((0.001, axes[0]), (0.01, axes[1]), (0.01, axes[2])):
        references = [run for key, run in precise.items() if key[0] == lr]
        panel.plot(np.array(references[0]["steps"]), np.mean([run["precise_val_accuracy"] for run in references], 0),
                   color="black", linestyle=":", linewidth=2, label="precise BN (same weights)")
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, loc="lower right" if panel is not axes[2] else "center right")
    axes[0].set_title("lr 0.001: the three rules at momentum 0.99", fontsize=10)
    axes[1].set_title("lr 0.01: the three rules at momentum 0.99", fontsize=10)
    axes[2].set_title("lr 0.01: EMA and debiased EMA by momentum", fontsize=10)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    figure.suptitle("(a) Running-average rules vs. precise BN (BN net, sigmoid, Adam, batch 32)")
    figure.tight_layout()
    save_figure(figure, out / "rules.png", dpi=100)
    return "\n".join(lines)


# ---------------------------------------------------------------- (b) samples
# Precise BN from N training examples (N / 32 batches of 32, three draws each
# but the whole set) for the final weights of the article's BN net (SIZES: one epoch).
SAMPLE_SIZES = (32, 128, 512, 2048, 8192, 32768, 60000)
SAMPLE_DRAWS = 3


def samples_configs(seeds: int, size: Size = SIZES["cpu"]) -> list[TrainConfig]:
    return [TrainConfig(batch_norm=True, activation=activation, learning_rate=lr, epochs=size.epochs, eval_every=625,
                        seed=seed)
            for activation, lr in (("relu", 0.001), ("sigmoid", 0.01)) for seed in range(seeds)]


def measure_samples(config: TrainConfig, history, state, data) -> dict:
    accuracy, seconds = {}, {}
    for size in SAMPLE_SIZES:
        draws = 1 if size == len(data.x_train) else SAMPLE_DRAWS
        start = time.perf_counter()
        accuracy[str(size)] = [evaluate(state.replace(batch_stats=recompute_batch_stats(
            state, data.x_train, 32, size // 32, seed=draw + 1)), data.x_test, data.y_test)["accuracy"]
            for draw in range(draws)]
        seconds[str(size)] = (time.perf_counter() - start) / draws
    print(f"samples {config.activation} lr {config.learning_rate:g} seed {config.seed}: running "
          f"{history.val_accuracy[-1]:.4f}; precise by examples "
          + ", ".join(f"{size}: {np.mean(accuracy[str(size)]):.4f}" for size in SAMPLE_SIZES), flush=True)
    return {"precise_accuracy_by_examples": accuracy, "precise_seconds_by_examples": seconds}


def summarize_samples(runs: list[dict], out: Path) -> str:
    lines = [f"Final weights of {runs[0]['steps'][-1]} steps of the BN net, batch 32. Test accuracy with precise BN "
             f"statistics from N training examples (N/32 batches of 32; mean over seeds and {SAMPLE_DRAWS} draws, "
             "the whole set drawn once) against the running averages (EMA, momentum 0.99). Worst: the lowest "
             "single draw. Time: one re-estimation and test, compile included.", "",
             "| setting | running | " + " | ".join(f"N={size}" for size in SAMPLE_SIZES) + " |",
             "|---" * (2 + len(SAMPLE_SIZES)) + "|"]
    figure, panel = plt.subplots(figsize=(6.5, 4.2))
    for (activation, lr), color in zip((("relu", 0.001), ("sigmoid", 0.01)), ("tab:red", "tab:blue")):
        group = [run for run in runs if (run["config"]["activation"], run["config"]["learning_rate"]) == (activation, lr)]
        if not group:
            continue
        by_size = [[value for run in group for value in run["precise_accuracy_by_examples"][str(size)]]
                   for size in SAMPLE_SIZES]
        running = [run["val_accuracy"][-1] for run in group]
        lines.append(f"| {activation}, lr {lr:g} ({len(group)} seeds) | {mean_std(running)} | "
                     + " | ".join(f"{np.mean(values):.4f} (worst {np.min(values):.4f})" for values in by_size) + " |")
        seconds = [np.mean([run["precise_seconds_by_examples"][str(size)] for run in group]) for size in SAMPLE_SIZES]
        lines.append("| time, s | | " + " | ".join(f"{value:.2f}" for value in seconds) + " |")
        panel.plot(SAMPLE_SIZES, [np.mean(values) for values in by_size], color=color, marker="o",
                   label=f"{activation}, lr {lr:g}: precise BN (mean)")
        panel.fill_between(SAMPLE_SIZES, [np.min(values) for values in by_size], [np.max(values) for values in by_size],
                           color=color, alpha=0.2, linewidth=0)
        panel.axhline(np.mean(running), color=color, linestyle="--", label=f"{activation}, lr {lr:g}: running averages")
    panel.set_xscale("log")
    panel.set_xlabel("training examples behind the precise statistics")
    panel.set_ylabel("test accuracy")
    panel.grid(alpha=0.3)
    panel.legend(fontsize=7, loc="lower right")
    panel.set_title("(b) How many examples precise BN needs (band: min-max over seeds and draws)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, out / "samples.png", dpi=100)
    return "\n".join(lines)


# ------------------------------------------------------------- (c) norm_batch
# The optimizer steps with a batch of 256 (SIZES), every BN normalizing ghost
# batches of NBS examples (the paper studies NBS from 2 to 1024).
GROUPED_EXAMPLES = 8192  # training examples (and test images, up to the test set) evaluated with batch statistics


def norm_batch_configs(seeds: int, size: Size = SIZES["cpu"]) -> list[TrainConfig]:
    return [TrainConfig(batch_norm=True, activation="relu", batch_size=size.norm_batch, max_steps=size.norm_steps,
                        eval_every=size.norm_steps // 4, seed=seed,
                        bn=None if nbs == size.norm_batch else keras_bn(ghost_batch_size=nbs))
            for nbs in size.norm_sizes for seed in range(seeds)]


def normalization_batch(config) -> int:
    config = config if isinstance(config, dict) else config.to_dict()
    return config["bn"]["ghost_batch_size"] or config["batch_size"]


def measure_norm_batch(config: TrainConfig, history, state, data) -> dict:
    # Batch statistics: batches of the training batch size through the model, which splits
    # them into its ghost batches exactly as in training.
    train_images, train_labels = jnp.asarray(data.x_train[:GROUPED_EXAMPLES]), jnp.asarray(data.y_train[:GROUPED_EXAMPLES])
    test_images, test_labels = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    population = recompute_batch_stats(state, data.x_train, POPULATION_BATCH, POPULATION_BATCHES)
    populated = state.replace(batch_stats=population)
    record = {
        "train_batch_accuracy": float(batch_statistics_accuracy(state, train_images, train_labels, config.batch_size)),
        "test_batch_accuracy": float(batch_statistics_accuracy(state, test_images, test_labels, config.batch_size)),
        "test_population_accuracy": evaluate(populated, data.x_test, data.y_test)["accuracy"],
        "train_population_accuracy": evaluate(populated, data.x_train[:GROUPED_EXAMPLES],
                                              data.y_train[:GROUPED_EXAMPLES])["accuracy"],
    }
    print(f"norm_batch {normalization_batch(config)} seed {config.seed}: "
          + ", ".join(f"{key} {value:.4f}" for key, value in record.items()), flush=True)
    return record


NORM_COLUMNS = (("train_batch_accuracy", "train set, batch statistics"),
                ("test_batch_accuracy", "test set, batch statistics"),
                ("test_population_accuracy", "test set, population statistics"),
                ("train_population_accuracy", "train set, population statistics"),
                ("val_accuracy", "test set, running averages (EMA 0.99)"))


def summarize_norm_batch(runs: list[dict], out: Path) -> str:
    sizes = sorted({normalization_batch(run["config"]) for run in runs})
    batch, steps_run = runs[0]["config"]["batch_size"], runs[0]["steps"][-1]
    lines = [f"BN net, relu, Adam lr 0.001, batch {batch}, {steps_run} steps, every BN normalizing ghost batches "
             f"of NBS examples. Batch statistics: train mode on {GROUPED_EXAMPLES} training examples / the test set "
             f"in batches of {batch} split as in training; population statistics: precise BN from "
             f"{POPULATION_BATCHES} training batches of {POPULATION_BATCH} (no ghost batches). Accuracy, mean ± std "
             "over seeds.", "",
             "| NBS | seeds | " + " | ".join(name for _, name in NORM_COLUMNS) + " |",
             "|---" * (2 + len(NORM_COLUMNS)) + "|"]
    figure, panel = plt.subplots(figsize=(6.5, 4.2))
    for (key, name), color in zip(NORM_COLUMNS, ("tab:green", "tab:blue", "tab:red", "tab:olive", "tab:gray")):
        values = []
        for size in sizes:
            group = [run for run in runs if normalization_batch(run["config"]) == size]
            values.append([run[key][-1] if key == "val_accuracy" else run[key] for run in group])
        panel.errorbar(sizes, [1 - np.mean(v) for v in values], yerr=[np.std(v) for v in values], color=color,
                       marker="o", capsize=3, label=name, linestyle="--" if key.startswith("train") else "-")
    for size in sizes:
        group = [run for run in runs if normalization_batch(run["config"]) == size]
        cells = [mean_std([run[key][-1] if key == "val_accuracy" else run[key] for run in group])
                 for key, _ in NORM_COLUMNS]
        lines.append(f"| {size} | {len(group)} | " + " | ".join(cells) + " |")
    panel.set_xscale("log", base=2)
    panel.set_yscale("log")
    panel.set_xlabel("normalization batch size (NBS)")
    panel.set_ylabel("error (1 - accuracy)")
    panel.grid(alpha=0.3, which="both")
    panel.legend(fontsize=7)
    panel.set_title(f"(c) Normalization batch size inside a batch of {batch} (mean ± std over seeds)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, out / "norm_batch.png", dpi=100)
    return "\n".join(lines)


# ----------------------------------------------------------------- (d) renorm
# BN vs. Batch Renorm (r_max 3, d_max 5, both opened over RENORM_WARMUP steps)
# at batch 2, 4, 8, over a third of an epoch (SIZES; the batch-size ablation
# trains a whole one).
RENORM_BATCH_SIZES = (2, 4, 8)
RENORM_WARMUP = 500


def renorm_configs(seeds: int, size: Size = SIZES["cpu"]) -> list[TrainConfig]:
    configs = []
    for batch_size in RENORM_BATCH_SIZES:
        steps = size.renorm_examples // batch_size
        for renorm in (False, True):
            configs += [TrainConfig(batch_norm=True, activation="relu", batch_size=batch_size, epochs=1,
                                    steps_per_epoch=steps, eval_every=steps // 8, bn=keras_bn(
                                        renorm=Renorm(warmup_steps=RENORM_WARMUP)) if renorm else None, seed=seed)
                        for seed in range(seeds)]
    return configs


def measure_renorm(config: TrainConfig, history, state, data) -> dict:
    record = {"test_population_accuracy": population_accuracy(state, data)}
    print(f"renorm {config.bn_layer().renorm is not None} batch {config.batch_size} seed {config.seed}: running "
          f"{history.val_accuracy[-1]:.4f}, population {record['test_population_accuracy']:.4f}", flush=True)
    return record


def summarize_renorm(runs: list[dict], out: Path) -> str:
    examples = runs[0]["steps"][-1] * runs[0]["config"]["batch_size"]
    lines = [f"BN net, relu, Adam lr 0.001, {examples} training examples at each batch size (fixed order); "
             f"Batch Renorm: r_max 3, d_max 5, opened over the first {RENORM_WARMUP} steps. Final test accuracy with "
             "the running averages (eval mode) and with population statistics (precise BN from "
             f"{POPULATION_BATCHES} batches of {POPULATION_BATCH}); training accuracy in train mode over the last full "
             "evaluation interval. Mean ± std over seeds.", "",
             "| batch | steps | net | seeds | running | population | training (train mode) |", "|---" * 7 + "|"]
    figure, axes = plt.subplots(1, len(RENORM_BATCH_SIZES), figsize=(13, 3.8), sharey=True)
    for panel, batch_size in zip(axes, RENORM_BATCH_SIZES):
        for renorm, color in ((False, "tab:red"), (True, "tab:blue")):
            group = [run for run in runs if run["config"]["batch_size"] == batch_size
                     and (run["config"]["bn"]["renorm"] is not None) == renorm]
            if not group:
                continue
            name = "Batch Renorm" if renorm else "BN"
            steps = np.array(group[0]["steps"])
            curves = np.array([run["val_accuracy"] for run in group])
            panel.plot(steps, curves.mean(0), color=color, label=f"{name}: test (running averages)")
            panel.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2, linewidth=0)
            full = last_full_interval_index(group[0]) + 1
            panel.plot(steps[:full], np.mean([run["train_accuracy"][:full] for run in group], 0), color=color,
                       linestyle="--", linewidth=1, label=f"{name}: training (train mode, whole intervals)")
            lines.append(f"| {batch_size} | {steps[-1]} | {name} | {len(group)} | "
                         f"{mean_std([run['val_accuracy'][-1] for run in group])} | "
                         f"{mean_std([run['test_population_accuracy'] for run in group])} | "
                         f"{mean_std([last_full_interval(run, 'train_accuracy') for run in group])} |")
        panel.set_title(f"batch {batch_size}", fontsize=10)
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle("(d) Batch Renorm vs. BN at small batches (band: min-max over seeds)")
    figure.tight_layout()
    save_figure(figure, out / "renorm.png", dpi=100)
    return "\n".join(lines)


# ------------------------------------------------------------------ (e) shift
# The article's BN net (relu, lr 0.001; SIZES: one epoch), tested on shifted copies
# of the test set: its BN statistics from the training set vs. re-estimated on
# the shifted images themselves (no labels used; every image is both).
def shifted_test_sets(images):
    """name -> shifted copy of (N, 28, 28, 1) uint8 `images`, deterministic."""
    floats = images.astype(np.float32)
    noise = np.random.default_rng(0).normal(0.0, 0.3 * 255, images.shape)
    return {
        "clean": images,
        "noise (std 0.3)": np.clip(floats + noise, 0, 255).round().astype(np.uint8),
        "rotated 30°": np.clip(ndimage.rotate(floats, 30, axes=(2, 1), reshape=False, order=1), 0, 255)
        .round().astype(np.uint8),
        "low contrast (x 0.4 + 0.3)": (floats * 0.4 + 0.3 * 255).round().astype(np.uint8),
        "inverted": (255 - images).astype(np.uint8),
    }


def shift_configs(seeds: int, size: Size = SIZES["cpu"]) -> list[TrainConfig]:
    return [TrainConfig(batch_norm=True, activation="relu", epochs=size.epochs, eval_every=625, seed=seed)
            for seed in range(seeds)]


def measure_shift(config: TrainConfig, history, state, data) -> dict:
    train_stats = recompute_batch_stats(state, data.x_train, 32, PRECISE_BATCHES)
    record = {}
    for name, images in shifted_test_sets(np.asarray(data.x_test)).items():
        target_stats = recompute_batch_stats(state, images, 32, PRECISE_BATCHES)
        record[name] = {
            "running": evaluate(state, images, data.y_test)["accuracy"],
            "train_population": evaluate(state.replace(batch_stats=train_stats), images, data.y_test)["accuracy"],
            "target_population": evaluate(state.replace(batch_stats=target_stats), images, data.y_test)["accuracy"],
        }
    print(f"shift seed {config.seed}: " + "; ".join(
        f"{name} {values['train_population']:.4f} -> {values['target_population']:.4f}"
        for name, values in record.items()), flush=True)
    return {"shift_accuracy": record}


def summarize_shift(runs: list[dict], out: Path) -> str:
    names = list(runs[0]["shift_accuracy"])
    columns = (("running", "running averages"), ("train_population", "training set's statistics"),
               ("target_population", "re-estimated on the shifted images"))
    lines = [f"BN net, relu, Adam lr 0.001, batch 32, {runs[0]['steps'][-1]} steps; test accuracy on shifted copies of the test set "
             f"(mean ± std over seeds). Statistics: the running averages; precise BN from {PRECISE_BATCHES} batches of "
             f"32 training images; precise BN from {PRECISE_BATCHES} batches of 32 of the shifted test images "
             "(labels unused).", "",
             "| test set | " + " | ".join(name for _, name in columns) + " |", "|---" * (1 + len(columns)) + "|"]
    figure, panel = plt.subplots(figsize=(8, 4.2))
    width = 0.27
    for offset, ((key, name), color) in enumerate(zip(columns, ("tab:gray", "tab:red", "tab:blue"))):
        values = [[run["shift_accuracy"][test][key] for run in runs] for test in names]
        panel.bar(np.arange(len(names)) + (offset - 1) * width, [np.mean(v) for v in values], width,
                  yerr=[np.std(v) for v in values], color=color, label=name, capsize=3)
    for test in names:
        lines.append(f"| {test} | " + " | ".join(mean_std([run["shift_accuracy"][test][key] for run in runs])
                                                 for key, _ in columns) + " |")
    panel.set_xticks(np.arange(len(names)), names, fontsize=8)
    panel.set_ylabel("test accuracy")
    panel.set_ylim(0, 1)
    panel.grid(alpha=0.3, axis="y")
    panel.legend(fontsize=7, loc="lower left")
    panel.set_title(f"(e) Domain shift: whose BN statistics to test with ({len(runs)} seeds)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, out / "shift.png", dpi=100)
    return "\n".join(lines)


# ------------------------------------------------------------------- driver
PARTS = {
    "rules": (rules_configs, None, summarize_rules),
    "samples": (samples_configs, measure_samples, summarize_samples),
    "norm_batch": (norm_batch_configs, measure_norm_batch, summarize_norm_batch),
    "renorm": (renorm_configs, measure_renorm, summarize_renorm),
    "shift": (shift_configs, measure_shift, summarize_shift),
}


def run_part(part: str, args: argparse.Namespace) -> None:
    make_configs, measure, summarize = PARTS[part]
    out = args.out / part
    configs = [config if args.max_steps is None else dataclasses.replace(
        config, max_steps=min(args.max_steps, config.max_steps or args.max_steps),
        eval_every=min(config.eval_every, args.max_steps)) for config in make_configs(args.seeds, SIZES[args.size])]
    saved_before = len(load_results(out / "results.json")["runs"])
    start = time.perf_counter()
    results = run_sweep(configs, out / "results.json", load_mnist, strategy=sweep_strategy(args), measure=measure,
                        name=part,
                        **run_folders(args, part))
    minutes = (time.perf_counter() - start) / 60
    table = summarize(results["runs"], out)
    command = f"python -m experiments.rethinking_batch {part} --seeds {args.seeds}" + (
        f" --max-steps {args.max_steps}" if args.max_steps else "") + (f" --size {args.size}" if args.size != "cpu" else "")
    trained = len(results["runs"]) - saved_before
    sitting = (f"this sitting trained {trained} of its runs in {minutes:.1f} min on {jax.device_count()} "
               f"{jax.default_backend()} device(s)" if trained else "redrawn from results.json, nothing trained")
    commit = results.get("environment", {}).get("bnjax_commit", "unknown")
    with atomic_write(out / "summary.md", "w") as file:
        file.write(f"Made by `{command}` (runs trained at bnjax commit {commit}; {sitting}).\n\n{table}\n")
    print(f"{part}: {minutes:.1f} min; wrote {out}/summary.md and its figure", flush=True)


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu",
                        help="cpu: sized to 2 CPU cores (the committed results); full: the sizes they were cut from")
    add_sweep_flags(parser, seeds=3, epochs=None, study="rethinking_batch")
    args = parser.parse_args(argv)
    output_folder(args, "rethinking_batch")
    for part in PARTS if args.part == "all" else [args.part]:
        run_part(part, args)


if __name__ == "__main__":
    run_resumable(main)
