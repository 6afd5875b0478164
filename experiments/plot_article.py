"""Figures and summary table of the article sweep, from results.json alone.

    python -m experiments.plot_article [outputs/article/results.json]

Never trains. Writes one PNG per (learning rate, activation) and summary.md
next to results.json.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.data.datasets import DATASETS  # noqa: E402
from bnjax.support.atomic import atomic_write  # noqa: E402
from experiments.results import load_results, save_figure  # noqa: E402

# Final validation accuracies logged in the article's notebook
# (Keras_Batch_Normalization.ipynb, one run each): (lr, activation) -> (plain, BN).
ARTICLE_NOTEBOOK_FINAL = {
    (0.001, "relu"): (0.9893, 0.9899),
    (0.01, "relu"): (0.9749, 0.9900),
    (0.05, "relu"): (0.1028, 0.9725),
    (0.001, "sigmoid"): (0.9755, 0.9364),
    (0.01, "sigmoid"): (0.1135, 0.9513),
    (0.05, "sigmoid"): (0.0956, 0.8367),
}
MNIST_TRAIN_SIZE = 60000


def group_runs(runs: list[dict]) -> dict[tuple, dict[bool, list[dict]]]:
    """{(lr, activation, epochs, max_steps, other settings...): {batch_norm: [runs over seeds]}}.
    A setting's BN runs share one set of BN settings (`bn`); runs of another
    are refused in one line rather than averaged with them."""
    groups: dict[tuple, dict[bool, list[dict]]] = defaultdict(lambda: {False: [], True: []})
    for run in runs:
        config = run["config"]
        # The BN runs of a setting may also measure precise BN (eval_statistics), the plain ones cannot.
        setting = tuple(sorted((k, v) for k, v in config.items()
                               if k not in ("batch_norm", "bn", "seed", "eval_statistics")))
        group = groups[setting][config["batch_norm"]]
        if group and group[0]["config"]["bn"] != config["bn"]:
            raise SystemExit(f"error: runs of one setting with two BN settings, {group[0]['config']['bn']} and "
                             f"{config['bn']}: the article's figures compare one BN with the plain net")
        group.append(run)
    return groups


def steps_per_epoch(config: dict) -> int:
    return config["steps_per_epoch"] or MNIST_TRAIN_SIZE // config["batch_size"]


def stacked(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (n_runs, n_steps)) over every step any run evaluated at;
    a run has NaN where it has no value (it stopped early: diverged, or was
    saved with fewer evaluations; or its `key` curve is empty)."""
    steps = sorted({step for run in runs for step in run["steps"]})
    column = {step: i for i, step in enumerate(steps)}
    values = np.full((len(runs), len(steps)), np.nan)
    for i, run in enumerate(runs):
        for step, value in zip(run["steps"], run[key]):
            values[i, column[step]] = value
    return np.asarray(steps), values


def figure_name(setting: dict) -> str:
    name = f"{setting['activation']}_lr{setting['learning_rate']:g}"
    if setting["epochs"] != 3 or setting["max_steps"] is not None:
        name += f"_epochs{setting['epochs']}" + (f"_max{setting['max_steps']}" if setting["max_steps"] else "")
    return name + ".png"


def seeds_phrase(count: int) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


def title_of(setting: dict, dataset: str) -> str:
    """The figure's title; a run shorter or longer than the article's recipe (3 epochs) says its size."""
    size = ""
    if setting["max_steps"] is not None:
        size = f", {setting['max_steps']} steps only"
    elif setting["epochs"] != 3:
        size = f", {setting['epochs']} epochs"
    return (f"{dataset} CNN, Adam lr={setting['learning_rate']:g}, {setting['activation']}, "
            f"batch {setting['batch_size']}{size}")


def group_figure(setting: dict, runs_by_bn: dict[bool, list[dict]], dataset: str = "MNIST"):
    """The figure of one setting: validation and training accuracy of the plain and BN runs, the legend
    below the axes (never over a curve), markers where a curve has few points."""
    figure, axes = plt.subplots(figsize=(8, 6.2))
    for batch_norm, color in ((False, "tab:blue"), (True, "tab:red")):
        runs = runs_by_bn[batch_norm]
        if not runs:
            continue
        label = "BN" if batch_norm else "plain"
        steps, val = stacked(runs, "val_accuracy")
        _, train_acc = stacked(runs, "train_accuracy")
        epochs = steps / steps_per_epoch(runs[0]["config"])
        marker = {"marker": "o", "markersize": 4} if len(steps) < 12 else {}
        with np.errstate(all="ignore"):
            val_mean = np.nanmean(val, axis=0)
        diverged = sum(run["diverged"] for run in runs)
        suffix = f", {diverged} diverged" if diverged else ""
        mean = "" if len(runs) == 1 else "mean of "
        axes.plot(epochs, val_mean, color=color, label=f"{label} validation ({mean}{seeds_phrase(len(runs))}{suffix})",
                  **marker)
        if len(runs) > 1:
            axes.fill_between(epochs, np.nanmin(val, axis=0), np.nanmax(val, axis=0), color=color, alpha=0.2,
                              linewidth=0, label=f"{label} validation min-max over seeds")
        axes.plot(epochs, np.nanmean(train_acc, axis=0), color=color, linestyle="--", linewidth=1,
                  label=f"{label} training (mean since previous point)", **marker)
        if batch_norm and has_precise(runs):
            _, precise = stacked(runs, "precise_val_accuracy")
            with np.errstate(all="ignore"):
                axes.plot(epochs, np.nanmean(precise, axis=0), color="black", linestyle=":", linewidth=1.5,
                          label="BN validation, same weights, precise BN statistics", **marker)
    axes.set_xlabel("epoch", fontsize=12)
    axes.set_ylabel("accuracy", fontsize=12)
    axes.tick_params(labelsize=11)
    axes.set_ylim(0, 1.0)
    axes.grid(alpha=0.3)
    axes.set_title(title_of(setting, dataset), fontsize=12)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=10, frameon=False)
    figure.tight_layout()
    return figure


def plot_group(setting: dict, runs_by_bn: dict[bool, list[dict]], path: Path, dataset: str = "MNIST") -> None:
    save_figure(group_figure(setting, runs_by_bn, dataset), path, dpi=110)


def has_precise(runs: list[dict]) -> bool:
    """Whether these runs measured precise BN at every evaluation (eval_statistics "precise")."""
    return bool(runs) and all(run.get("precise_val_accuracy") for run in runs)


def final_accuracies(runs: list[dict], key: str = "val_accuracy") -> np.ndarray:
    return np.array([run[key][-1] for run in runs])


def precise_cost_s(groups) -> float | None:
    """Seconds per evaluation spent on precise BN (re-estimation and the extra
    test-set pass), mean over every run that measured it."""
    costs = [run["eval_statistics_time_s"] / len(run["steps"]) for runs_by_bn in groups.values()
             for run in runs_by_bn[True] if run.get("precise_val_accuracy")]
    return float(np.mean(costs)) if costs else None


def last_epoch_swing(runs: list[dict], key: str = "val_accuracy") -> float:
    """Mean over seeds of (max - min) validation accuracy among the evaluations
    of the last epoch: how much the test accuracy moves while training goes on."""
    swings = []
    for run in runs:
        last_epoch_start = run["steps"][-1] - steps_per_epoch(run["config"])
        in_last_epoch = [acc for step, acc in zip(run["steps"], run[key]) if step > last_epoch_start]
        swings.append(max(in_last_epoch) - min(in_last_epoch))
    return float(np.mean(swings))


def summary_cell(runs: list[dict], key: str = "val_accuracy") -> str:
    if not runs:
        return "—"
    finals = final_accuracies(runs, key)
    diverged = sum(run["diverged"] for run in runs)
    cell = f"{finals.mean():.4f} ± {finals.std():.4f} (n={len(runs)})"
    return cell + (f", {diverged} diverged" if diverged else "")


def summary_markdown(groups, dataset: str = "mnist") -> str:
    notebook = ARTICLE_NOTEBOOK_FINAL if dataset == "mnist" else {}  # the article ran MNIST only
    cost = precise_cost_s(groups)  # None: no run measured precise BN; the table keeps its older columns
    lines = [
        f"Data set: {DATASETS[dataset].title}. Final validation (test-set) accuracy, mean ± std over seeds; swing = mean over seeds of max − min "
        "validation accuracy among the last epoch's evaluations."
        + ("" if cost is None else f" BN precise: the BN runs' final weights with precise BN statistics "
           f"(bnjax/training/precise_bn.py), measured at every evaluation, {cost:.2f} s per evaluation (compile included)."),
        "",
        "| lr | activation | epochs | plain | BN | article notebook plain / BN | plain swing | BN swing |"
        + ("" if cost is None else " BN precise | BN precise swing |"),
        "|---|---|---|---|---|---|---|---|" + ("" if cost is None else "---|---|"),
    ]
    for key in sorted(groups, key=lambda k: (dict(k)["activation"], dict(k)["learning_rate"], dict(k)["epochs"])):
        setting, runs_by_bn = dict(key), groups[key]
        article = notebook.get((setting["learning_rate"], setting["activation"]))
        full_length = setting["epochs"] == 3 and setting["max_steps"] is None
        article_cell = f"{article[0]:.4f} / {article[1]:.4f}" if article and full_length else "—"
        epochs = f"{setting['epochs']}" + (f" (max {setting['max_steps']} steps)" if setting["max_steps"] else "")
        swings = [f"{last_epoch_swing(runs):.4f}" if runs else "—" for runs in (runs_by_bn[False], runs_by_bn[True])]
        row = (f"| {setting['learning_rate']:g} | {setting['activation']} | {epochs} | "
               f"{summary_cell(runs_by_bn[False])} | {summary_cell(runs_by_bn[True])} | {article_cell} | "
               f"{swings[0]} | {swings[1]} |")
        if cost is not None:
            bn = runs_by_bn[True]
            row += (f" {summary_cell(bn, 'precise_val_accuracy')} | {last_epoch_swing(bn, 'precise_val_accuracy'):.4f} |"
                    if has_precise(bn) else " — | — |")
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot_all(results_path: Path) -> None:
    results = load_results(results_path)
    if not results["runs"]:
        raise SystemExit(f"error: {results_path} holds no runs to plot")
    groups = group_runs(results["runs"])
    out_dir = results_path.parent
    dataset = results.get("dataset", "mnist")  # files from before --dataset existed hold MNIST runs
    for key, runs_by_bn in groups.items():
        plot_group(dict(key), runs_by_bn, out_dir / figure_name(dict(key)), DATASETS[dataset].title)
    with atomic_write(out_dir / "summary.md", "w") as file:
        file.write(summary_markdown(groups, dataset))
    print(f"wrote {len(groups)} figures and summary.md to {out_dir}", flush=True)


if __name__ == "__main__":
    plot_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/article/results.json"))
