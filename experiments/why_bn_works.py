"""Why does BN help? The article's explanation (BN keeps each layer's input
distribution steady: "internal covariate shift") against Santurkar, Tsipras,
Ilyas and Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018), on the article's CNN at its settings.

    python -m experiments.why_bn_works [--steps 1000] [--eval-every 50] [--seeds 3] [--out outputs/why_bn_works]

Runs: Adam at batch 32, relu and sigmoid, lr 0.001 and 0.01, three nets
each: plain, BN, and noisy BN (`bnjax.bn.noisy.NoisyBatchNorm`: every BN's
output shifted by U(-1, 1) and rescaled by 2**U(-1, 1) per feature, drawn
afresh at every step), `--seeds` seeds each. At every evaluation (every
`--eval-every` steps) a probe measures, on one fixed batch of PROBE_BATCH
training images, with the loss in train mode (batch statistics):
  * the distribution shift: how far each hidden layer's input moves (mean in
    units of its standard deviation, relative variance) over one optimizer
    step (`moments_shift`), noise included;
  * internal covariate shift as the paper measures it: each layer's weight
    gradient before and after the layers below take that step, ||G - G'||
    and cos(G, G') (`gradient_shift`);
  * smoothness along the gradient: the loss's spread, the gradient's change
    and the effective beta-smoothness over step sizes STEP_SIZES x the run's
    learning rate (`gradient_line`).
A probe point costs 15 forward-backward passes of PROBE_BATCH images (one
optimizer step, 5 gradients for the shift, 7 for the line) and 2 forwards.

Sized to 2 CPU cores: the paper trains to convergence; here 1000 steps
(about half an epoch) per run, probed 20 times: 36 runs in about 50 minutes.
The paper-like length is `--steps 5625 --eval-every 250` (the article's 3 epochs).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.bn.noisy import NoisyBatchNorm  # noqa: E402
from bnjax.bn.batchnorm import keras_bn  # noqa: E402
from bnjax.training.config import TrainConfig  # noqa: E402
from bnjax.training.landscape import gradient_line, gradient_shift, layer_inputs, moments_shift  # noqa: E402
from bnjax.training.steps import cross_entropy_loss, to_float_images, train_step_body  # noqa: E402
from experiments.results import load_results, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, positive_int, run_folders, run_sweep,  # noqa: E402
                               sweep_strategy)

VARIANTS = ("plain", "BN", "noisy BN")
SETTINGS = [(0.001, "relu"), (0.01, "relu"), (0.001, "sigmoid"), (0.01, "sigmoid")]  # (learning rate, activation)
PROBE_BATCH = 64
STEP_SIZES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # x the run's learning rate, along the gradient
COLORS = {"plain": "tab:blue", "BN": "tab:red", "noisy BN": "tab:green"}


def variant_settings(variant: str) -> dict:
    """The TrainConfig fields of one of VARIANTS."""
    noisy = dict(bn=keras_bn(NoisyBatchNorm)) if variant == "noisy BN" else {}
    return dict(batch_norm=variant != "plain", **noisy)


def variant_of(config: dict) -> str:
    """Which of VARIANTS a saved config (`TrainConfig.to_dict`'s form) is."""
    if not config["batch_norm"]:
        return "plain"
    return "noisy BN" if config["bn"]["layer"] == "NoisyBatchNorm" else "BN"


def study_configs(steps: int, eval_every: int, seeds: int) -> list[TrainConfig]:
    return [TrainConfig(**variant_settings(variant), activation=activation, learning_rate=learning_rate,
                        max_steps=steps, eval_every=eval_every, seed=seed)
            for learning_rate, activation in SETTINGS for variant in VARIANTS for seed in range(seeds)]


def layer_groups(params: dict) -> list[tuple[str, ...]]:
    """The net's layers input side first, each with its BN (the k-th BN
    belongs to the k-th Conv/Dense): [("Conv_0", "BatchNorm_0"), ...]."""
    index = lambda name: int(name.rsplit("_", 1)[1])  # noqa: E731
    layers = sorted((n for n in params if re.fullmatch(r"(Conv|Dense)_\d+", n)),
                    key=lambda n: (not n.startswith("Conv"), index(n)))
    norms = sorted((n for n in params if "BatchNorm" in n), key=index)
    return [(layer, *norms[position:position + 1]) for position, layer in enumerate(layers)]


def _loss(state, images, labels):
    """loss(params): the train-mode loss on the probe batch (the running statistics' update dropped)."""
    def loss_fn(params):
        if state.batch_stats is None:
            logits = state.apply_fn({"params": params}, images, train=True)
        else:
            logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                       mutable=["batch_stats"])
        return cross_entropy_loss(logits, labels)
    return loss_fn


def _hidden_inputs(state, images) -> dict:
    """What each layer but the first reads, in train mode (noise included)."""
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    mutable = ["batch_stats"] if state.batch_stats else False
    inputs = layer_inputs(lambda: state.apply_fn(variables, images, train=True, mutable=mutable))
    return {name: value for name, value in inputs.items() if name != "Conv_0"}


@jax.jit
def measure(state, images, labels, step_sizes):
    """The module doc's measurements at `state`, over one optimizer step on the probe batch."""
    next_state, _ = train_step_body(state, images, labels)
    groups = layer_groups(state.params)
    shifts = gradient_shift(_loss(state, images, labels), state.params, next_state.params, groups)
    line = gradient_line(_loss(state, images, labels), state.params, step_sizes)
    before, after = _hidden_inputs(state, images), _hidden_inputs(next_state, images)
    moved = [moments_shift(before[name], after[name]) for name in before]
    return {"ics_l2": jnp.mean(jnp.stack([s["l2"] for s in shifts.values()])),
            "ics_cosine": jnp.mean(jnp.stack([s["cosine"] for s in shifts.values()])),
            **{f"ics_l2_{name}": s["l2"] for name, s in shifts.items()},
            "loss_spread": line["loss_spread"], "max_gradient_change": line["max_gradient_change"],
            "beta": line["beta"],
            "mean_shift": jnp.mean(jnp.stack([m["mean_shift"] for m in moved])),
            "variance_shift": jnp.mean(jnp.stack([m["variance_shift"] for m in moved]))}


def landscape_probe(config: TrainConfig, data):
    """The probe of each run (`make_probe` of the sweep): `measure` on a fixed batch of training images."""
    chosen = np.random.default_rng(0).permutation(len(data.x_train))[:PROBE_BATCH]
    images, labels = to_float_images(jnp.asarray(data.x_train[chosen])), jnp.asarray(data.y_train[chosen])
    step_sizes = jnp.asarray(STEP_SIZES, jnp.float32) * config.learning_rate
    return lambda state: {key: float(value) for key, value in measure(state, images, labels, step_sizes).items()}


# ---------------------------------------------------------------- report

def grouped(runs: list[dict]) -> dict:
    """{(learning rate, activation, variant): [runs]}."""
    groups: dict = {}
    for run in runs:
        config = run["config"]
        groups.setdefault((config["learning_rate"], config["activation"], variant_of(config)), []).append(run)
    return groups


def probe_curve(runs: list[dict], key: str) -> np.ndarray:
    """(seeds, points) of one probe value."""
    return np.array([[probe[key] for probe in run["probes"]] for run in runs])


def band(axis, steps, values, color, label, log=False):
    """Mean over seeds as a line, min..max as a band."""
    axis.plot(steps, values.mean(0), color=color, label=label, marker="o" if len(steps) < 12 else None,
              markersize=3)
    axis.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
    if log:
        axis.set_yscale("log")


def plot_panels(groups: dict, curves: list[tuple[str, str, bool]], path: Path, title: str) -> None:
    """One row per (lr, activation), one column per curve (key, label, log
    scale); plain, BN and noisy BN as bands over seeds."""
    figure, axes = plt.subplots(len(SETTINGS), len(curves), figsize=(4.2 * len(curves), 2.9 * len(SETTINGS)),
                                squeeze=False)
    for row, (learning_rate, activation) in enumerate(SETTINGS):
        for column, (key, label, log) in enumerate(curves):
            axis = axes[row][column]
            for variant, color in COLORS.items():
                runs = groups.get((learning_rate, activation, variant))
                if not runs:
                    continue
                steps = np.array(runs[0]["steps"])
                values = np.array([run[key] for run in runs]) if key in runs[0] else probe_curve(runs, key)
                band(axis, steps, values, color, variant, log)
            axis.set_title(f"{label}\n{activation}, lr {learning_rate}", fontsize=10)
            axis.set_xlabel("training step")
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.suptitle(title, y=0.995, fontsize=12)
    figure.legend(handles, labels, loc="upper center", ncol=3, fontsize=11, bbox_to_anchor=(0.5, 0.975))
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    save_figure(figure, path, dpi=90)


def mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.4f} ± {values.std():.4f}"


def summary(groups: dict, seeds: int, steps: int) -> str:
    rows = ["| lr | activation | net | final test acc | final train loss | input shift (mean, in std) | "
            "ICS ||G - G'|| | ICS cos(G, G') | loss spread | max grad change | effective beta |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for learning_rate, activation in SETTINGS:
        for variant in VARIANTS:
            runs = groups.get((learning_rate, activation, variant))
            if not runs:
                continue
            over_path = {key: np.median(probe_curve(runs, key)) for key in
                         ("mean_shift", "ics_l2", "ics_cosine", "loss_spread", "max_gradient_change", "beta")}
            rows.append(f"| {learning_rate} | {activation} | {variant} | "
                        f"{mean_std([run['val_accuracy'][-1] for run in runs])} | "
                        f"{mean_std([run['train_loss'][-1] for run in runs])} | {over_path['mean_shift']:.3g} | "
                        f"{over_path['ics_l2']:.3g} | {over_path['ics_cosine']:.3f} | {over_path['loss_spread']:.3g} | "
                        f"{over_path['max_gradient_change']:.3g} | {over_path['beta']:.3g} |")
    seeds_text = "1 seed" if seeds == 1 else f"{seeds} seeds"
    command = "python -m experiments.why_bn_works" + ("" if steps == 1000 else f" --steps {steps}") + (
        "" if seeds == 3 else f" --seeds {seeds}")
    return (f"# Why BN helps: the article's net, {steps} steps, {seeds_text} per row\n\n"
            f"Made by `{command}`; the machine and versions are in results.json.\n\n"
            "Final test accuracy (running averages) and training loss: mean ± std over seeds. The probe columns: "
            "the median over the training path (every probe point of every seed) of the module doc's "
            "measurements (experiments/why_bn_works.py).\n\n" + "\n".join(rows) + "\n")


def report(results_path: Path) -> None:
    results = load_results(results_path)
    groups = grouped(results["runs"])
    seeds = max(len(runs) for runs in groups.values())
    steps = max(run["steps"][-1] for run in results["runs"])
    size = f"{steps} steps, {seeds} seed{'s' if seeds > 1 else ''}"
    out = results_path.parent
    plot_panels(groups, [("train_loss", "training loss", True), ("val_accuracy", "test accuracy", False),
                         ("mean_shift", "layer input's mean shift per step", True)],
                out / "noisy_bn.png", f"Noisy BN: does BN still help when layer inputs' distributions move? ({size})")
    plot_panels(groups, [("ics_l2", "ICS: ||G - G'||", True), ("ics_cosine", "ICS: cos(G, G')", False)],
                out / "internal_covariate_shift.png", f"Internal covariate shift as Santurkar et al. measure it ({size})")
    plot_panels(groups, [("loss_spread", "loss spread along the gradient", True),
                         ("max_gradient_change", "gradient change (predictiveness)", True),
                         ("beta", "effective beta-smoothness", True)],
                out / "smoothness.png", f"Smoothness along the training path ({size})")
    (out / "summary.md").write_text(summary(groups, seeds, steps))


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="the article's explanation of BN tested (Santurkar et al. 2018)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per run (default 1000)")
    parser.add_argument("--eval-every", type=positive_int, default=50,
                        help="steps between evaluations and probe points (default 50)")
    add_sweep_flags(parser, seeds=3, epochs=None, study="why_bn_works")
    args = parser.parse_args(argv)
    output_folder(args, "why_bn_works")
    steps = min(args.steps, args.max_steps or args.steps)
    results_path = args.out / "results.json"
    configs = study_configs(steps, args.eval_every, args.seeds)
    run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args), make_probe=landscape_probe,
              name="why_bn_works",
              **run_folders(args))
    report(results_path)
    print(f"wrote noisy_bn.png, internal_covariate_shift.png, smoothness.png and summary.md to {args.out}", flush=True)


if __name__ == "__main__":
    run_resumable(main)
