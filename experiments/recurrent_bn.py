"""Recurrent Batch Normalization (Cooijmans et al., ICLR 2017) on sequential
MNIST: LSTM vs. BN-LSTM, the initial BN scale, per-step statistics.

    python -m experiments.recurrent_bn                                   # rows: 28 steps of 28 pixels
    python -m experiments.recurrent_bn --task pixels --seeds 1 --max-steps 600
    python -m experiments.recurrent_bn --task permuted_pixels --seeds 1 --max-steps 600
    python -m experiments.recurrent_bn --task permuted_pixels --epochs 200   # the paper's length: a GPU's job

Every run uses the paper's settings (`paper_settings` of the BN-LSTM's module:
100 hidden units, RMSProp lr 1e-3, gradient norm clipped at 1, batches of
100) and is tested on the 10,000 test images every --eval-every steps. BN-LSTM
accuracy is measured as the paper measures it, with population statistics
(precise BN, re-estimated for the current weights from --precise-batches
training batches); the running averages' accuracy is recorded beside it.
Three parts, written to --out (default outputs/recurrent_bn):

  curves     LSTM vs. BN-LSTM (gamma 0.1) vs. BN-LSTM with gamma 1.0 on the
             task: learning curves, mean and band over seeds (<task>.png);
  flow       the paper's gradient-flow argument: the norm of dLoss/dh_t for
             every step t at initialization, gamma 0.1 vs. 1.0 vs. no BN, on
             a batch of 100 training images (gradient_flow_<task>.png);
  statistics each finished BN-LSTM tested with per-step statistics vs. one
             set shared by all steps (the pooled statistics over steps).

summary.md holds the tables; results.json every run; gradient_flow.json the norms.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.support.checks import OneLineArgumentParser  # noqa: E402
from bnjax.data.datasets import load_mnist  # noqa: E402
from bnjax.nets.recurrent import SEQUENCES, paper_settings, sequence_length  # noqa: E402
from bnjax.support.atomic import atomic_write, write_json  # noqa: E402
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import evaluate  # noqa: E402
from bnjax.training.precise_bn import average_statistics, recompute_batch_stats  # noqa: E402
from bnjax.training.steps import cross_entropy_loss, model_of  # noqa: E402
from bnjax.training.steps import create_train_state, to_float_images
from experiments.results import run_key, run_resumable, save_figure  # noqa: E402
from experiments.sweep import (add_sweep_flags, output_folder, positive_int, run_folders, run_sweep,  # noqa: E402
                               sweep_strategy)

# The paper's numbers (its table 2: test accuracy, %, early-stopped models,
# population statistics): 784-pixel sequences in order and permuted.
PAPER_ACCURACY = {"pixels": {"LSTM": 98.9, "BN-LSTM": 99.0}, "permuted_pixels": {"LSTM": 90.2, "BN-LSTM": 95.4}}
# (label, batch_norm, initial BN scale)
MODELS = [("LSTM", False, 0.1), ("BN-LSTM", True, 0.1), ("BN-LSTM, gamma 1.0", True, 1.0)]
COLORS = {"LSTM": "tab:blue", "BN-LSTM": "tab:red", "BN-LSTM, gamma 1.0": "tab:orange"}


def model_label(config: dict) -> str:
    return next(label for label, batch_norm, scale in MODELS
                if config["batch_norm"] == batch_norm and (not batch_norm or config["lstm_bn_scale_init"] == scale))


def sweep_configs(task: str, seeds: int, epochs: int, max_steps: int | None, eval_every: int,
                  precise_batches: int) -> list[TrainConfig]:
    return [TrainConfig(**{**paper_settings(batch_norm), "lstm_bn_scale_init": scale}, sequence=task,
                        epochs=epochs, max_steps=max_steps, seed=seed, eval_every=eval_every, shuffle=True,
                        eval_statistics="precise" if batch_norm else "running",
                        precise_bn_batches=precise_batches)
            for _, batch_norm, scale in MODELS for seed in range(seeds)]


def shared_over_steps(batch_stats, steps: int):
    """One set of statistics for all steps, as a BN shared over time would
    estimate it: each BN's first `steps` rows averaged as precise BN averages
    batches, with the pooled variance (the variance of all those steps'
    values together), copied into every row."""
    pooled = average_statistics({layer: {name: stats[name][:steps] for name in ("mean", "var")}
                                 for layer, stats in batch_stats.items()}, variance="pooled")
    return {layer: {**stats, **{name: jnp.broadcast_to(value, stats[name].shape)
                                for name, value in pooled[layer].items()}}
            for layer, stats in batch_stats.items()}


def per_step_vs_shared(config: TrainConfig, history, state, data) -> dict:
    """A finished BN-LSTM tested with its per-step statistics and with one set
    shared by all steps, for the running averages and the precise ones."""
    if not config.batch_norm:
        return {}
    steps = sequence_length(config.sequence)
    precise = recompute_batch_stats(state, data.x_train, config.batch_size, config.precise_bn_batches)
    accuracy = {}
    for name, batch_stats in (("running", state.batch_stats), ("precise", precise)):
        for kind, stats in (("per_step", batch_stats), ("shared", shared_over_steps(batch_stats, steps))):
            accuracy[f"{kind}_{name}_accuracy"] = evaluate(state.replace(batch_stats=stats), data.x_test,
                                                           data.y_test)["accuracy"]
    return accuracy


def hidden_gradient_norms(config: TrainConfig, images, labels) -> np.ndarray:
    """|| dLoss / dh_t || for every step t (over the batch and the hidden
    units) at initialization, in train mode (batch statistics)."""
    state = create_train_state(config, jax.random.key(config.seed))
    model = model_of(state)
    steps = sequence_length(config.sequence)
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}

    @jax.jit
    def loss(offsets):
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"], hidden_offsets=offsets)
        return cross_entropy_loss(logits, labels)

    gradient = jax.grad(loss)(jnp.zeros((len(labels), steps, config.lstm_hidden_size)))
    return np.asarray(jnp.sqrt(jnp.sum(jnp.square(gradient), axis=(0, 2))))


def gradient_flow(task: str, data, seeds: int) -> dict:
    images, labels = to_float_images(jnp.asarray(data.x_train[:100])), jnp.asarray(data.y_train[:100])
    norms = {}
    for label, batch_norm, scale in MODELS:
        per_seed = [hidden_gradient_norms(TrainConfig(**{**paper_settings(batch_norm), "lstm_bn_scale_init": scale},
                                                      sequence=task, seed=seed), images, labels)
                    for seed in range(seeds)]
        norms[label] = np.mean(per_seed, axis=0).tolist()
    return norms


def mean_band(runs, key):
    values = np.array([run[key] for run in runs], dtype=float)
    return values.mean(0), values.min(0), values.max(0)


def plot_curves(runs: list[dict], task: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for label in COLORS:
        group = [run for run in runs if model_label(run["config"]) == label]
        if not group:
            continue
        steps = np.array(group[0]["steps"])
        key = "precise_val_accuracy" if group[0]["config"]["batch_norm"] else "val_accuracy"
        mean, low, high = mean_band(group, key)
        suffix = " (population statistics)" if group[0]["config"]["batch_norm"] else ""
        axes.plot(steps, mean, color=COLORS[label], label=label + suffix)
        if len(group) > 1:
            axes.fill_between(steps, low, high, color=COLORS[label], alpha=0.2, linewidth=0)
        if group[0]["config"]["batch_norm"]:
            axes.plot(steps, mean_band(group, "val_accuracy")[0], color=COLORS[label], linestyle=":", linewidth=1,
                      label=f"{label} (running averages)")
    axes.set_xlabel("training step (batches of 100)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.set_title(f"sequential MNIST, {task} ({sequence_length(task)} steps), RMSProp lr 1e-3")
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def plot_flow(norms: dict, task: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4))
    for label, values in norms.items():
        axes.semilogy(np.arange(1, len(values) + 1), values, color=COLORS[label], label=label)
    axes.set_xlabel("time step t")
    axes.set_ylabel("|| dLoss / dh_t ||")
    axes.grid(alpha=0.3)
    axes.set_title(f"gradient reaching each step at initialization, {task}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def summary_lines(runs: list[dict], flow: dict) -> list[str]:
    lines = ["| task | model | seeds | steps | final test accuracy (mean ± std; BN: population statistics) | "
             "BN: running averages | BN: per-step vs. shared statistics | paper (784 steps, early-stopped) |",
             "|---|---|---|---|---|---|---|---|"]
    for task in SEQUENCES:
        for label in COLORS:
            group = [run for run in runs if run["config"]["sequence"] == task and model_label(run["config"]) == label]
            if not group:
                continue
            key = "precise_val_accuracy" if group[0]["config"]["batch_norm"] else "val_accuracy"
            finals = np.array([run[key][-1] for run in group])
            running = (f"{np.mean([run['val_accuracy'][-1] for run in group]):.4f}"
                       if group[0]["config"]["batch_norm"] else "")
            shared = (f"{np.mean([run['per_step_precise_accuracy'] for run in group]):.4f} vs. "
                      f"{np.mean([run['shared_precise_accuracy'] for run in group]):.4f}"
                      if "shared_precise_accuracy" in group[0] else "")
            paper = PAPER_ACCURACY.get(task, {}).get(label)
            lines.append(f"| {task} | {label} | {len(group)} | {group[0]['steps'][-1]} | {finals.mean():.4f} ± "
                         f"{finals.std():.4f} | {running} | {shared} | {'' if paper is None else f'{paper:.1f}%'} |")
    if flow:
        lines += ["", "Gradient reaching step t at initialization, || dLoss / dh_t || (step 1 vs. the last):", "",
                  "| task | model | t = 1 | last step | ratio |", "|---|---|---|---|---|"]
        for task, norms in flow.items():
            for label, values in norms.items():
                first, last = values[0], values[-1]
                lines.append(f"| {task} | {label} | {first:.3g} | {last:.3g} | {first / last:.3g} |")
    return lines


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="LSTM vs. BN-LSTM on sequential MNIST (Cooijmans et al. 2017)")
    parser.add_argument("--task", choices=list(SEQUENCES), default="rows",
                        help="rows: 28 steps of 28 pixels; pixels / permuted_pixels: 784 steps of 1 (the paper's)")
    add_sweep_flags(parser, seeds=3, epochs=2, study="recurrent_bn")
    parser.add_argument("--eval-every", type=positive_int, default=100, help="steps between evaluations (default 100)")
    parser.add_argument("--precise-batches", type=positive_int, default=50,
                        help="training batches of 100 for the population statistics (default 50)")
    args = parser.parse_args(argv)
    output_folder(args, "recurrent_bn")

    results_path = args.out / "results.json"
    configs = sweep_configs(args.task, args.seeds, args.epochs, args.max_steps, args.eval_every, args.precise_batches)
    results = run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args), measure=per_step_vs_shared,
                        name=f"recurrent_bn {args.task}",
                        **run_folders(args))

    flow_path = args.out / "gradient_flow.json"
    flows = json.loads(flow_path.read_text()) if flow_path.exists() else {}  # {task: {model: norms}}
    if args.task not in flows:
        flows[args.task] = gradient_flow(args.task, load_mnist(), args.seeds)
        write_json(flow_path, flows)
    wanted = {run_key(config.to_dict()) for config in configs}
    plot_curves([run for run in results["runs"] if run_key(run["config"]) in wanted], args.task,
                args.out / f"{args.task}.png")
    plot_flow(flows[args.task], args.task, args.out / f"gradient_flow_{args.task}.png")
    with atomic_write(args.out / "summary.md", "w") as file:
        file.write("\n".join(summary_lines(results["runs"], flows)) + "\n")
    print(f"wrote {args.out}/{args.task}.png, gradient_flow_{args.task}.png and summary.md", flush=True)


if __name__ == "__main__":
    run_resumable(main)
