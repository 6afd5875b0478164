"""The figures and summary.md of experiments/why_bn_works.py, from its
results.json and deep_linear.json:

    python -m experiments.why_bn_works_report outputs/why_bn_works

Every verdict is a paired comparison over seeds (experiments/paired.py): a
net against another trained from the same seeds, one number per seed (the
last probe's value, or the median over the probe points from step 0 on),
the mean difference with its 95% Student-t interval. A measure that spans
orders of magnitude (ICS, smoothness, input shifts) is compared as a ratio:
the paired difference of its logarithms, given back as a ratio and its
interval. In every figure a line is the mean over seeds and its band the
lowest to the highest seed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.atomic import atomic_write  # noqa: E402
from experiments.paired import paired_difference  # noqa: E402
from experiments.results import load_results, save_figure  # noqa: E402

COLORS = {"plain": "tab:blue", "BN": "tab:red", "noisy BN": "tab:green", "plain + noise": "tab:purple",
          "noisy BN, logits too": "tab:olive", "l1 BN": "tab:orange", "l2 BN": "tab:brown", "linf BN": "tab:pink"}
HIDDEN = ("Conv_1", "Conv_2", "Dense_0", "Dense_1")  # the layers with a layer below them
PART_TITLES = {"sgd 0.1": "SGD lr 0.1, relu", "sgd 0.5": "SGD lr 0.5, relu", "adam": "Adam lr 0.001, relu",
               "sigmoid": "Adam lr 0.01, sigmoid"}
BAND = "line: mean over {seeds} seeds; band: lowest to highest seed"


def grouped(runs: list[dict]) -> dict:
    """{(part, variant): [runs in seed order]}."""
    from experiments.why_bn_works import part_of, variant_of

    groups: dict = {}
    for run in sorted(runs, key=lambda run: run["config"]["seed"]):
        groups.setdefault((part_of(run["config"]), variant_of(run["config"])), []).append(run)
    return groups


def curve(run: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one probe value, step 0 first."""
    probes = [run["probe_at_start"]] + run["probes"]
    return (np.array([0] + run["steps"][:len(run["probes"])]),
            np.array([_number(probe.get(key)) for probe in probes], np.float64))


def _number(value) -> float:
    """A saved probe value: NaN where a diverged run's was saved as null."""
    return np.nan if value is None else float(value)


def per_seed(runs: list[dict], key: str, over: str) -> np.ndarray:
    """One value per seed: the last probe's ("final") or the median over the path ("path")."""
    values = [curve(run, key)[1] for run in runs]
    return np.array([value[-1] if over == "final" else np.median(value) for value in values])


def compare(treated, control, ratio: bool) -> tuple[str, str]:
    """(the paired comparison as text, its verdict), or why none can be made."""
    treated, control = np.asarray(treated, np.float64), np.asarray(control, np.float64)
    broken = [f"{np.sum(~np.isfinite(values))} of {len(values)} {side} seeds diverged"
              for side, values in (("first net's", treated), ("second net's", control))
              if not np.all(np.isfinite(values))]
    if broken:
        return f"not comparable: {', '.join(broken)}", "n/a"
    try:
        if ratio:
            if np.any(treated <= 0) or np.any(control <= 0):
                raise ValueError("a value is not positive")
            difference = paired_difference(np.log(treated), np.log(control))
            return (f"x{math.exp(difference.mean):.3g} [{math.exp(difference.low):.3g}, "
                    f"{math.exp(difference.high):.3g}]", difference.verdict)
        difference = paired_difference(treated, control)
        return f"{difference.mean:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}]", difference.verdict
    except ValueError as error:
        return f"not comparable ({error})", "n/a"


def band(axis, steps, values, color, label, log=False):
    axis.plot(steps, np.nanmean(values, 0), color=color, label=label, marker="o" if len(steps) < 25 else None,
              markersize=2.5)
    axis.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=color, alpha=0.2)
    if log:
        axis.set_yscale("log")


def plot_grid(groups: dict, rows: list[str], columns: list[tuple], variants: tuple, path: Path, title: str) -> None:
    """A grid of panels: one row per part, one column per (key, y label,
    log scale); each variant's runs as a band. Nothing where no such runs are saved."""
    rows = [part for part in rows if any((part, variant) in groups for variant in variants)]
    if not rows:
        return
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(4.0 * len(columns), 2.9 * len(rows)),
                                squeeze=False)
    seeds = 0
    for row, part in enumerate(rows):
        for column, (key, label, log) in enumerate(columns):
            axis = axes[row][column]
            for variant in variants:
                runs = groups.get((part, variant))
                if runs:
                    seeds = max(seeds, len(runs))
                    steps = curve(runs[0], key)[0]
                    values = np.array([curve(run, key)[1][:len(steps)] for run in runs if
                                       len(curve(run, key)[1]) >= len(steps)])
                    band(axis, steps, values, COLORS[variant], variant, log)
            axis.set_title(PART_TITLES[part], fontsize=9)
            axis.set_xlabel("training step")
            axis.set_ylabel(label, fontsize=8)
            axis.grid(alpha=0.3)
    handles = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.suptitle(f"{title}\n{BAND.format(seeds=seeds)}", y=0.995, fontsize=11)
    figure.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=9,
                  bbox_to_anchor=(0.5, 0.955))
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    save_figure(figure, path, dpi=80)


def plot_moments(groups: dict, part: str, path: Path) -> None:
    """The paper's Fig. 8: one hidden unit's input mean +- its standard
    deviation over the probe batch along training, seed 0, per layer and net."""
    variants = [variant for variant in ("plain", "BN", "noisy BN", "plain + noise") if (part, variant) in groups]
    figure, axes = plt.subplots(len(variants), len(HIDDEN), figsize=(3.6 * len(HIDDEN), 2.4 * len(variants)),
                                squeeze=False, sharex=True)
    for row, variant in enumerate(variants):
        run = groups[(part, variant)][0]
        for column, layer in enumerate(HIDDEN):
            steps, mean = curve(run, f"unit_mean/{layer}")
            std = curve(run, f"unit_std/{layer}")[1]
            axis = axes[row][column]
            axis.plot(steps, mean, color=COLORS[variant])
            axis.fill_between(steps, mean - std, mean + std, color=COLORS[variant], alpha=0.25)
            axis.set_title(f"{variant}: input of {layer}", fontsize=9)
            axis.set_ylabel("unit 0's value", fontsize=8)
            axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("training step")
    figure.suptitle(f"Layer inputs' moments ({PART_TITLES[part]}, seed 0, train mode with the noise on): unit 0's mean over "
                    f"the probe batch (line) +- its standard deviation (band)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(figure, path, dpi=80)


def plot_deep_linear(deep: dict, path: Path) -> None:
    """Loss along training, and each layer's ICS (median over the path) by depth, plain and BN."""
    rates = sorted({run["learning_rate"] for run in deep["runs"]})
    figure, axes = plt.subplots(2, len(rates), figsize=(5.0 * len(rates), 6.4), squeeze=False)
    for column, rate in enumerate(rates):
        for batch_norm, variant in ((False, "plain"), (True, "BN")):
            runs = [run for run in deep["runs"] if run["learning_rate"] == rate and run["batch_norm"] == batch_norm]
            losses = np.array([[np.nan if value is None else value for value in run["loss"]] for run in runs])
            band(axes[0][column], runs[0]["steps"], losses, COLORS[variant], variant, log=True)
            layers = list(runs[0]["ics"]["relative"])
            medians = np.array([[np.nanmedian(np.array(run["ics"]["relative"][layer], np.float64))
                                 for layer in layers] for run in runs])
            band(axes[1][column], np.arange(1, len(layers) + 1), medians, COLORS[variant], variant, log=True)
        axes[0][column].set(title=f"deep linear network, lr {rate}", xlabel="gradient descent step",
                            ylabel="training loss (full batch)")
        axes[1][column].set(title=f"ICS by depth, lr {rate}", xlabel="layer (1 = second layer)",
                            ylabel="||G - G'|| / ||G||, median over steps")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle(f"Santurkar et al.'s deep linear network (25 x 10), full-batch gradient descent\n"
                    f"{BAND.format(seeds=deep['seeds'])}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(figure, path, dpi=80)


def figures(groups: dict, deep: dict | None, out: Path) -> None:
    relu_parts = ["sgd 0.1", "sgd 0.5", "adam"]
    noise_variants = ("plain", "BN", "noisy BN", "plain + noise", "noisy BN, logits too")
    plot_grid(groups, relu_parts, [("train_loss_noise_on", "training loss, noise on", True),
                                   ("train_loss_noise_off", "training loss, noise off", True),
                                   ("test_accuracy_noise_off", "test accuracy, noise off", False)],
              noise_variants, out / "noisy_bn.png",
              "Noisy BN (Algorithm 1) and the same noise on the plain net; losses on 256 fixed training images, "
              "accuracy on 512 test images, batches of 32 by their own statistics")
    plot_moments(groups, "sgd 0.1", out / "moments.png")
    for measure, label in (("ics_relative", "||G - G'|| / ||G||"), ("ics_cosine", "cos(G, G')")):
        plot_grid(groups, relu_parts, [(f"{measure}/{layer}", f"{layer}: {label}", measure != "ics_cosine")
                                       for layer in HIDDEN], ("plain", "BN", "noisy BN"),
                  out / f"{measure}.png", f"Internal covariate shift per layer, as Santurkar et al. measure it")
    plot_grid(groups, relu_parts + ["sigmoid"], [("loss_spread", "loss spread along the gradient", True),
                                                ("max_gradient_change", "largest gradient change", True),
                                                ("beta", "effective beta-smoothness", True),
                                                ("grad_norm", "||g||", True)],
              ("plain", "BN"), out / "smoothness.png",
              "The landscape along the gradient, steps of [1/2, 4] x lr, on a fixed batch of 64")
    plot_grid(groups, ["adam"], [("train_loss_noise_off", "training loss", True),
                                 ("test_accuracy_noise_off", "test accuracy", False),
                                 ("beta", "effective beta-smoothness", True)],
              ("plain", "BN", "l1 BN", "l2 BN", "linf BN"), out / "lp_norms.png",
              "l_p normalizations on the article's net, Adam lr 0.001")
    if deep is not None:
        plot_deep_linear(deep, out / "deep_linear.png")


# ---------------------------------------------------------------- summary

def layer_mean(run: dict, prefix: str) -> dict:
    """A run with one more probe value: `prefix` averaged over the hidden layers."""
    probes = [run["probe_at_start"]] + run["probes"]
    for probe in probes:
        probe[prefix] = float(np.mean([_number(probe[f"{prefix}/{layer}"]) for layer in HIDDEN]))
    return run


def claim_rows(groups: dict) -> list[tuple]:
    """(claim, measure, setting, nets, comparison, verdict) of the CNN's runs."""
    rows = []

    def row(claim, label, key, over, ratio, part, treated, control):
        if (part, treated) in groups and (part, control) in groups:
            text, verdict = compare(per_seed(groups[(part, treated)], key, over),
                                    per_seed(groups[(part, control)], key, over), ratio)
            rows.append((claim, label, part, f"{treated} vs {control}", text, verdict))

    parts = ("sgd 0.1", "sgd 0.5", "adam", "sigmoid")
    for part in parts:
        row("BN trains faster", "final training loss, noise off", "train_loss_noise_off", "final", False, part,
            "BN", "plain")
        row("BN generalizes at least as well", "final test accuracy, batch statistics", "test_accuracy_noise_off",
            "final", False, part, "BN", "plain")
    for part in parts[:3]:
        for treated, control in (("noisy BN", "BN"), ("noisy BN", "plain"), ("plain + noise", "plain"),
                                 ("noisy BN, logits too", "noisy BN")):
            row("noise hardly hurts BN; it stops the plain net" if control != "noisy BN" else
                "ablation: the logits' BN noisy too", "final training loss, noise off", "train_loss_noise_off",
                "final", False, part, treated, control)
        row("noisy BN's layer inputs move more than the plain net's", "input mean shift per step (mean of layers)",
            "mean_shift", "path", True, part, "noisy BN", "plain")
        for layer in HIDDEN:
            row("BN does not reduce ICS", f"{layer}: ||G - G'|| / ||G||", f"ics_relative/{layer}", "path", True,
                part, "BN", "plain")
            row("BN does not reduce ICS", f"{layer}: cos(G, G')", f"ics_cosine/{layer}", "path", False, part,
                "BN", "plain")
    for part in parts:
        for key, label in (("loss_spread", "loss spread"), ("max_gradient_change", "largest gradient change"),
                           ("beta", "effective beta"), ("grad_norm", "||g||")):
            row("BN makes the landscape smoother", f"{label} along the gradient", key, "path", True, part, "BN",
                "plain")
    for variant in ("l1 BN", "l2 BN", "linf BN"):
        for control in ("plain", "BN"):
            row("l_p normalization helps as BN does", "final training loss", "train_loss_noise_off", "final",
                False, "adam", variant, control)
        row("l_p normalization smooths as BN does", "effective beta along the gradient", "beta", "path", True,
            "adam", variant, "plain")
    return rows


def deep_linear_rows(deep: dict) -> list[tuple]:
    rows = []
    for rate in sorted({run["learning_rate"] for run in deep["runs"]}):
        runs = {batch_norm: [run for run in deep["runs"] if run["learning_rate"] == rate
                             and run["batch_norm"] == batch_norm] for batch_norm in (False, True)}
        final = {bn: [np.nan if run["loss"][-1] is None else run["loss"][-1] for run in runs[bn]] for bn in runs}
        rows.append(("BN trains faster", "final training loss", f"deep linear, lr {rate}", "BN vs plain",
                     *compare(final[True], final[False], ratio=True)))
        ics = {bn: [np.nanmedian([np.nanmedian(np.array(values, np.float64)) for values in
                                  run["ics"]["relative"].values()]) for run in runs[bn]] for bn in runs}
        rows.append(("BN does not reduce ICS", "||G - G'|| / ||G||, median over layers and steps",
                     f"deep linear, lr {rate}", "BN vs plain", *compare(ics[True], ics[False], ratio=True)))
    return rows


def finals_table(groups: dict) -> list[str]:
    lines = ["| setting | net | training loss, noise on | training loss, noise off | test accuracy, noise off | "
             "test accuracy, running averages |", "|---|---|---|---|---|---|"]
    for (part, variant), runs in groups.items():
        cells = [per_seed(runs, key, "final") for key in ("train_loss_noise_on", "train_loss_noise_off",
                                                          "test_accuracy_noise_off")]
        running = np.array([run["val_accuracy"][-1] for run in runs])
        lines.append(f"| {part} | {variant} | " + " | ".join(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"
                                                          for values in cells + [running]) + " |")
    return lines


def summary(groups: dict, deep: dict | None, command: str) -> str:
    seeds = max(len(runs) for runs in groups.values())
    rows = claim_rows(groups) + (deep_linear_rows(deep) if deep else [])
    table = ["| claim (Santurkar et al. / the article) | measure | setting | nets | paired difference "
             "[95% interval] | verdict (first net's value) |", "|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows]
    return (f"# Why BN helps, measured as Santurkar et al. measure it: {seeds} seeds\n\n"
            f"Made by `{command}` (experiments/why_bn_works.py has the runs and probes, "
            "experiments/why_bn_works_report.py this summary); the machine and versions are in results.json.\n\n"
            "Each comparison pairs two nets trained from the same seeds: one number per seed (the last probe's, "
            "\"final\", or the median over the probe points from step 0, for the other measures), the mean "
            "difference and its 95% Student-t interval; measures that span orders of magnitude as a ratio "
            "(x: the first net's over the second's, the geometric mean over seeds). The verdict reads the "
            "interval: higher or lower where it excludes no difference (0, or x1).\n\n"
            + "\n".join(table) + "\n\n## Final values, mean ± standard deviation over seeds\n\n"
            "Training losses on 256 fixed training images, test accuracy with the noise off on 512 test images, "
            "both in batches of 32 normalized by their own statistics; the running averages' test accuracy on "
            "the whole test set.\n\n" + "\n".join(finals_table(groups)) + "\n")


def report(out: Path, command: str = "python -m experiments.why_bn_works") -> None:
    results = load_results(out / "results.json")
    groups = grouped([layer_mean(run, "mean_shift") for run in results["runs"]])
    deep_path = out / "deep_linear.json"
    deep = json.loads(deep_path.read_text()) if deep_path.exists() else None
    figures(groups, deep, out)
    with atomic_write(out / "summary.md", "w") as file:
        file.write(summary(groups, deep, command))


if __name__ == "__main__":
    report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/why_bn_works"))
