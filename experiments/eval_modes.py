"""Train mode vs. test mode: why BN's test accuracy swings, and what fixes it.

    python -m experiments.eval_modes [--seeds 2] [--epochs 1] [--out outputs/eval_modes]

Trains the article's BN net (sigmoid, Adam lr 0.01, batch 32) for one epoch
with BN momentum 0.9, 0.99 (the article's) and 0.999, and at lr 0.001 with
momentum 0.99, evaluating the test set every 100 steps in three ways:

  running   eval mode: BN normalizes with its running averages (what
            `eval_step` and every curve of the article sweep report);
  batch     train mode on test batches of 1000: each batch's own statistics;
  precise   eval mode with statistics re-estimated for the current weights:
            the equal-weight mean of the batch means and batch variances of
            PRECISE_BATCHES training batches of 32 ("precise BN", Wu & Johnson 2021).

At each evaluation it also measures, layer by layer, how far the running
averages are from the precise statistics of the current weights: the mean
gap in units of the precise standard deviation, and the ratio of the
normalizers (running_var + eps) / (precise_var + eps). After training, the
final weights are tested with batch statistics at test batch sizes 1, 2, 8,
100 and 10000. On 2 CPU cores: about 90 s per run, 8 runs (2 seeds) ~12 min.
"""

from __future__ import annotations

import dataclasses
import time
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
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import batch_statistics_accuracy  # noqa: E402
from bnjax.training.evaluation import evaluate
from bnjax.training.precise_bn import precise_statistics, sample_batches  # noqa: E402
from bnjax.training.steps import make_model  # noqa: E402
from experiments.plot_article import seeds_phrase  # noqa: E402
from experiments.results import load_results, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, run_folders, run_sweep, sweep_strategy)  # noqa: E402

MOMENTA = (0.9, 0.99, 0.999)
TEST_BATCH_SIZES = (1, 2, 8, 100, 10000)
PRECISE_BATCHES = 200  # training batches of 32 whose statistics "precise BN" averages
BATCH_STATS_TEST_BATCH = 1000  # test batch size of the "batch" curve


def study_configs(seeds: int, epochs: int) -> list[TrainConfig]:
    settings = [(0.01, momentum) for momentum in MOMENTA] + [(0.001, 0.99)]
    return [TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=learning_rate, bn=keras_bn(momentum=momentum),
                        epochs=epochs, seed=seed)
            for learning_rate, momentum in settings for seed in range(seeds)]


def lag_by_layer(running: dict, precise: dict, epsilon: float) -> dict[str, float]:
    """Per BN layer: mean over channels of |running mean - precise mean| / precise
    std, and the geometric mean over channels of the normalizers' ratio."""
    lag = {}
    for layer in sorted(running):
        running_mean, running_var = running[layer]["mean"], running[layer]["var"]
        precise_mean, precise_var = precise[layer]["mean"], precise[layer]["var"]
        gap = jnp.abs(running_mean - precise_mean) / jnp.sqrt(precise_var + epsilon)
        ratio = jnp.exp(jnp.mean(jnp.log((running_var + epsilon) / (precise_var + epsilon))))
        lag[f"{layer}/mean_gap"] = float(gap.mean())
        lag[f"{layer}/var_ratio"] = float(ratio)
    return lag


class EvalModeProbe:
    """The probe of each run (`make_probe` of the sweep: built as
    `EvalModeProbe(config, data)` where the run trains): at each evaluation, the test accuracy with
    batch statistics and with precise statistics, and the running averages' lag."""

    def __init__(self, config: TrainConfig, data):
        self.config = config
        self.model = make_model(config)
        # The same training batches for every run and evaluation.
        self.precise_batches = sample_batches(data.x_train, config.batch_size, PRECISE_BATCHES, seed=12345)
        self.test_images, self.test_labels = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def precise(self, state):
        return precise_statistics(self.model, state.params, state.batch_stats, self.precise_batches)

    def __call__(self, state) -> dict[str, float]:
        precise = self.precise(state)
        record = {
            "batch_accuracy": float(batch_statistics_accuracy(
                state, self.test_images, self.test_labels, min(BATCH_STATS_TEST_BATCH, len(self.test_labels)))),
            "precise_accuracy": evaluate(state.replace(batch_stats=precise), self.test_images, self.test_labels)[
                "accuracy"],
        }
        return record | lag_by_layer(state.batch_stats, precise, self.config.bn_layer().epsilon)


def final_measurements(probe: EvalModeProbe, state) -> dict:
    """Test accuracy of the final weights at each test batch size (batch
    statistics), and the wall time of one precise-BN re-estimation."""
    by_batch_size = {str(size): float(batch_statistics_accuracy(state, probe.test_images, probe.test_labels, size))
                     for size in TEST_BATCH_SIZES if size <= len(probe.test_labels)}
    jax.block_until_ready(probe.precise(state))  # compiled already; time the work only
    start = time.perf_counter()
    jax.block_until_ready(probe.precise(state))
    return {"batch_size_accuracy": by_batch_size, "precise_bn_s": time.perf_counter() - start}


def label(config: dict) -> str:
    return f"lr {config['learning_rate']:g}, momentum {config['bn']['momentum']:g}"


def grouped(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(label(run["config"]), []).append(run)
    return groups


def probe_curve(runs: list[dict], key: str) -> np.ndarray:
    return np.array([[probe[key] for probe in run["probes"]] for run in runs])


def swing(values: np.ndarray, last: int = 5) -> float:
    """Mean over seeds of max - min over the last `last` evaluations."""
    tail = values[:, -last:]
    return float(np.mean(tail.max(axis=1) - tail.min(axis=1)))


def plot_and_summarize(results_path: Path) -> None:
    runs = load_results(results_path)["runs"]
    groups = grouped(runs)
    out = results_path.parent

    figure, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), sharey=True, squeeze=False)
    for panel, (name, group) in zip(axes[0], groups.items()):
        steps = np.array(group[0]["steps"])
        curves = {"running averages (eval mode)": np.array([run["val_accuracy"] for run in group]),
                  f"batch statistics (test batches of {BATCH_STATS_TEST_BATCH})": probe_curve(group, "batch_accuracy"),
                  f"precise BN ({PRECISE_BATCHES} train batches)": probe_curve(group, "precise_accuracy")}
        for (curve_name, values), color, style in zip(curves.items(), ("tab:red", "tab:green", "tab:purple"),
                                                      ("-", "-", "--")):
            panel.plot(steps, values.mean(0), color=color, linestyle=style, label=curve_name)
            panel.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, linewidth=0)
        panel.set_title(f"{name} ({seeds_phrase(len(group))})", fontsize=10)
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.suptitle("BN net, sigmoid, Adam: test accuracy by how BN gets its statistics (band: min-max over seeds)")
    figure.tight_layout()
    save_figure(figure, out / "eval_modes.png", dpi=100)

    layers = sorted({key.split("/")[0] for key in runs[0]["probes"][0] if "/" in key})
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    lag_group = groups["lr 0.01, momentum 0.99"]
    steps = np.array(lag_group[0]["steps"])
    for layer in layers:
        axes[0].plot(steps, probe_curve(lag_group, f"{layer}/mean_gap").mean(0), label=layer)
        axes[1].plot(steps, probe_curve(lag_group, f"{layer}/var_ratio").mean(0), label=layer)
    axes[0].set_title("|running mean - precise mean| / precise std", fontsize=10)
    axes[1].set_title("(running var + eps) / (precise var + eps)", fontsize=10)
    axes[1].set_yscale("log")
    for panel in axes:
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
    figure.suptitle("How far the running averages lag the weights (lr 0.01, momentum 0.99, mean over seeds)")
    figure.tight_layout()
    save_figure(figure, out / "running_average_lag.png", dpi=100)

    lines = [
        "Test accuracy (mean over seeds) of the BN net (sigmoid, Adam, batch 32). `running`: eval mode; "
        f"`batch`: train mode on test batches of {BATCH_STATS_TEST_BATCH}; `precise`: eval mode with statistics "
        f"re-estimated over {PRECISE_BATCHES} training batches. Swing: max - min over the last 5 evaluations "
        "(100 steps apart), mean over seeds.",
        "",
        "| setting | seeds | running (final) | batch (final) | precise (final) | running swing | precise swing | "
        + " | ".join(f"batch size {size}" for size in TEST_BATCH_SIZES) + " | precise BN time |",
        "|---" * (8 + len(TEST_BATCH_SIZES)) + "|",
    ]
    for name, group in groups.items():
        running = np.array([run["val_accuracy"] for run in group])
        batch, precise = probe_curve(group, "batch_accuracy"), probe_curve(group, "precise_accuracy")
        by_size = [np.mean([run["batch_size_accuracy"][str(size)] for run in group]) for size in TEST_BATCH_SIZES]
        lines.append(f"| {name} | {len(group)} | {running[:, -1].mean():.4f} | {batch[:, -1].mean():.4f} | "
                     f"{precise[:, -1].mean():.4f} | {swing(running):.4f} | {swing(precise):.4f} | "
                     + " | ".join(f"{value:.4f}" for value in by_size)
                     + f" | {np.mean([run['precise_bn_s'] for run in group]):.2f} s |")
    lines += ["", "Lag of the running averages, layer by layer (lr 0.01, momentum 0.99, mean over seeds): "
              "mean gap in precise standard deviations / normalizer ratio.", "",
              "| step | " + " | ".join(layers) + " | running acc | precise acc |", "|---" * (len(layers) + 3) + "|"]
    for index, step in enumerate(lag_group[0]["steps"]):
        if step % 300 and step != lag_group[0]["steps"][-1]:
            continue
        cells = [f"{probe_curve(lag_group, f'{layer}/mean_gap')[:, index].mean():.2f} / "
                 f"{probe_curve(lag_group, f'{layer}/var_ratio')[:, index].mean():.2f}" for layer in layers]
        accuracy = np.mean([run["val_accuracy"][index] for run in lag_group])
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {accuracy:.4f} | "
                     f"{probe_curve(lag_group, 'precise_accuracy')[:, index].mean():.4f} |")
    with atomic_write(out / "summary.md", "w") as file:
        file.write("\n".join(lines) + "\n")


def measure_final_state(config: TrainConfig, history, state, data) -> dict:
    """`final_measurements` of a finished run, printed in one line."""
    extra = final_measurements(EvalModeProbe(config, data), state)
    print(f"{label(config.to_dict())} seed {config.seed}: running {history.val_accuracy[-1]:.4f}, precise "
          f"{history.probes[-1]['precise_accuracy']:.4f}, test batch 1 / 10000: "
          f"{extra['batch_size_accuracy']['1']:.4f} / {extra['batch_size_accuracy']['10000']:.4f}", flush=True)
    return extra


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="train mode vs. test mode of BN")
    add_sweep_flags(parser, seeds=2, epochs=1, study="eval_modes")
    args = parser.parse_args(argv)
    output_folder(args, "eval_modes")
    results_path = args.out / "results.json"
    configs = [dataclasses.replace(config, max_steps=args.max_steps) for config in study_configs(args.seeds, args.epochs)]
    run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args), make_probe=EvalModeProbe,
              measure=measure_final_state, name="eval_modes",
              **run_folders(args))
    plot_and_summarize(results_path)
    print(f"wrote {args.out}/eval_modes.png, running_average_lag.png, summary.md", flush=True)


if __name__ == "__main__":
    run_resumable(main)
