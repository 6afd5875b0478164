"""The BN paper's MNIST figure (Ioffe & Szegedy 2015, section 4.1, Figure 1).

    python -m experiments.paper_mnist [--steps 50000] [--seeds 1] [--out outputs/paper_mnist]

An MLP of 3 fully connected hidden layers of 100 sigmoid units and a 10-way
softmax (`bnjax.nets.models.MLP`), mini-batches of 60, 50,000 steps, with and without
BN before each sigmoid. Records (a) test accuracy vs. steps and (b, c) the 15th,
50th and 85th percentiles, over the 10,000 test images, of the input to one
sigmoid of the last hidden layer (unit 0), every --eval-every steps.

Choices the paper leaves open: plain SGD (no momentum) at learning rate 0.5,
picked after one 3000-step check in which both nets trained stably (plain
0.943, BN 0.954 test accuracy); Gaussian (lecun-normal) initial weights; the
training set reshuffled every epoch; BN momentum 0.99, epsilon 1e-3 (as the
rest of bnjax). On 2 CPU cores the full study takes about 3 minutes.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.training.config import TrainConfig
from bnjax.training.steps import to_float_images  # noqa: E402
from experiments.results import load_results, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, positive_int, run_folders, run_sweep,  # noqa: E402
                               sweep_strategy)

PERCENTILES = (15, 50, 85)
UNIT = 0  # which sigmoid of the last hidden layer to follow


def paper_config(batch_norm: bool, steps: int, seed: int, eval_every: int) -> TrainConfig:
    return TrainConfig(model="mlp", activation="sigmoid", batch_norm=batch_norm, optimizer="sgd",
                       learning_rate=0.5, batch_size=60, epochs=math.ceil(steps / 1000), max_steps=steps,
                       eval_every=eval_every, shuffle=True, kernel_init="lecun_normal", seed=seed)


def sigmoid_input_percentiles(config: TrainConfig, data):
    """The probe of each run (`make_probe` of the sweep): percentiles of unit
    UNIT's sigmoid input in the last hidden layer, in eval mode, over the test images."""
    test_images = to_float_images(jnp.asarray(data.x_test))

    @jax.jit
    def percentiles(state):
        variables = {"params": state.params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        _, sown = state.apply_fn(variables, test_images, train=False, mutable=["intermediates"])
        last_hidden = sown["intermediates"]["sigmoid_input"][-1]  # (N, 100)
        return jnp.percentile(last_hidden[:, UNIT], jnp.array(PERCENTILES))

    return lambda state: {f"p{p}": float(v) for p, v in zip(PERCENTILES, percentiles(state))}


def plot(results_path: Path) -> None:
    runs = load_results(results_path)["runs"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for batch_norm, color in ((False, "tab:blue"), (True, "tab:red")):
        group = [run for run in runs if run["config"]["batch_norm"] == batch_norm]
        if not group:
            continue
        label = "with BN" if batch_norm else "without BN"
        steps = np.array(group[0]["steps"])
        axes[0].plot(steps, np.mean([run["val_accuracy"] for run in group], 0), color=color, label=label)
        panel = axes[2] if batch_norm else axes[1]
        for p, style in zip(PERCENTILES, (":", "-", ":")):
            values = np.mean([[probe[f"p{p}"] for probe in run["probes"]] for run in group], 0)
            panel.plot(steps, values, color=color, linestyle=style, label=f"{p}th percentile")
        panel.set_title(f"(b) sigmoid input, {label}" if not batch_norm else f"(c) sigmoid input, {label}")
    axes[0].set_title("(a) test accuracy")
    axes[0].set_ylim(0.85, 1.0)
    axes[0].legend()
    for panel in axes[1:]:
        panel.legend(fontsize=8)
    for panel in axes:
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, results_path.parent / "paper_mnist.png", dpi=100)


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="the BN paper's MNIST figure")
    parser.add_argument("--steps", type=positive_int, default=50000)
    parser.add_argument("--eval-every", type=positive_int, default=500)
    add_sweep_flags(parser, seeds=1, epochs=None, study="paper_mnist")
    args = parser.parse_args(argv)
    output_folder(args, "paper_mnist")
    steps = min(args.steps, args.max_steps or args.steps)
    results_path = args.out / "results.json"
    configs = [paper_config(batch_norm, steps, seed, args.eval_every)
               for seed in range(args.seeds) for batch_norm in (False, True)]
    run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args),
              make_probe=sigmoid_input_percentiles, name="paper_mnist",
              **run_folders(args))
    plot(results_path)
    print(f"wrote {args.out}/paper_mnist.png", flush=True)


if __name__ == "__main__":
    run_resumable(main)
