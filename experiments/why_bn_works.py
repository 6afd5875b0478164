"""Why does BN help? The article's explanation (BN keeps each layer's input
distribution steady: "internal covariate shift") against Santurkar, Tsipras,
Ilyas and Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018), measured as the paper measures it, on the article's CNN.

    python -m experiments.why_bn_works [--seeds 5] [--steps 1000] [--out outputs/why_bn_works]

The runs (PARTS; each net from seeds 0..--seeds-1, the same seeds for every
net, so that nets compare seed by seed), the relu ones 1000 steps of batch
32, evaluated and probed every 100:
  * "sgd 0.1" and "sgd 0.5": SGD (the paper's optimizer) at lr 0.1, where
    both nets train (BN faster over the first steps), and 0.5, where the
    plain net stalls and BN clearly helps: plain, BN, noisy BN (the paper's
    Algorithm 1, `santurkar_noisy_bn`) and the control, the same noise on the
    plain net (`santurkar_noisy_bn(normalize=False)`); at 0.1 also noisy BN
    with the logits' BN noisy too (an ablation);
  * "adam": the article's Adam at lr 0.001: plain, BN, noisy BN, the control,
    and the paper's l1, l2 and l-infinity normalizations (`LpBatchNorm`);
  * "sigmoid": the sigmoid net at Adam lr 0.01, plain and BN, probed every 10
    steps over its first 200, before the plain net's gradients vanish.
Each run is probed at step 0 and at every evaluation, on one fixed batch of
PROBE_BATCH training images, in train mode (batch statistics, noise on):
  * ICS per layer: each layer's weight gradient before (G) and after (G')
    the layers below take the run's own optimizer step: ||G - G'||,
    cos(G, G'), ||G - G'|| / ||G|| (`gradient_shift`);
  * the landscape along the gradient at STEP_SIZES x the run's learning rate
    (the paper's [1/2, 4] x lr): the loss's spread, the gradient's largest
    change, the effective beta-smoothness, and ||g|| (`gradient_line`);
  * each hidden layer's input: its mean's move over the step in standard
    deviations (`moments_shift`) and the mean and standard deviation of its
    unit 0 (the paper's Fig. 8 shows such moments);
  * the training loss and accuracy with the noise on and off (the same
    weights; off: each NoisyBatchNorm `without_noise`), on CHECK_TRAIN
    training images, and test accuracy with the noise off, on CHECK_TEST
    test images, both in batches of 32 normalized by their own statistics
    (no lag of the running averages).
A probe costs 11 forward-backward passes of PROBE_BATCH images, 2 forwards
of them, and forwards of 2 x CHECK_TRAIN + CHECK_TEST images.
The deep linear network (experiments/deep_linear.py) runs after the sweep.
experiments/why_bn_works_report.py makes the figures and summary.md.

Sized to 2 CPU cores (about an hour; run.log has the time): the paper trains
VGG on CIFAR-10 to convergence, here 1000 steps of batch 32 (half an epoch).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.bn.batchnorm import keras_bn
from bnjax.bn.lp_norm import LpBatchNorm
from bnjax.bn.noisy import NoisyBatchNorm, santurkar_noisy_bn
from bnjax.data.datasets import load_mnist
from bnjax.support.checks import OneLineArgumentParser
from bnjax.training.config import TrainConfig
from bnjax.training.landscape import gradient_line, gradient_shift, layer_inputs, moments_shift
from bnjax.training.steps import ModelApply, create_train_state, cross_entropy_loss, make_model, to_float_images
from bnjax.training.steps import train_step_body
from experiments import deep_linear
from experiments.results import run_resumable
from experiments.sweep import add_sweep_flags, output_folder, positive_int, run_folders, run_sweep, sweep_strategy
from experiments.why_bn_works_report import report


def variant_bn(variant: str):
    """(batch_norm, bn) of each net the study trains, by its name."""
    layers = {"plain": None, "BN": keras_bn(), "noisy BN": santurkar_noisy_bn(),
              "noisy BN, logits too": santurkar_noisy_bn(noise_logits=True),
              "plain + noise": santurkar_noisy_bn(normalize=False),
              "l1 BN": keras_bn(LpBatchNorm, p=1), "l2 BN": keras_bn(LpBatchNorm, p=2),
              "linf BN": keras_bn(LpBatchNorm, p=math.inf)}
    return layers[variant] is not None, layers[variant]


VARIANTS = ("plain", "BN", "noisy BN", "plain + noise", "noisy BN, logits too", "l1 BN", "l2 BN", "linf BN")


@dataclasses.dataclass(frozen=True)
class Part:
    """One optimizer setting of the study and the nets trained at it."""

    name: str
    optimizer: str
    learning_rate: float
    activation: str
    steps: int | None  # None: the --steps of the long parts
    eval_every: int | None  # None: --steps / 10
    variants: tuple[str, ...]


PARTS = (Part("sgd 0.1", "sgd", 0.1, "relu", None, None, VARIANTS[:5]),
         Part("sgd 0.5", "sgd", 0.5, "relu", None, None, VARIANTS[:4]),
         Part("adam", "adam", 0.001, "relu", None, None, VARIANTS[:4] + VARIANTS[5:]),
         Part("sigmoid", "adam", 0.01, "sigmoid", 200, 10, VARIANTS[:2]))
PROBE_BATCH = 64
STEP_SIZES = (0.5, 1.0, 2.0, 4.0)  # x the run's learning rate, along the gradient: the paper's [1/2, 4]
CHECK_TRAIN, CHECK_TEST, CHECK_BATCH = 256, 512, 32


def study_configs(steps: int, seeds: int) -> list[TrainConfig]:
    """Every run of PARTS, the long parts `steps` long."""
    configs = []
    for part in PARTS:
        part_steps = part.steps or steps
        for variant in part.variants:
            batch_norm, bn = variant_bn(variant)
            configs += [TrainConfig(batch_norm=batch_norm, bn=bn, activation=part.activation,
                                    optimizer=part.optimizer, learning_rate=part.learning_rate,
                                    max_steps=part_steps, eval_every=part.eval_every or max(1, part_steps // 10),
                                    seed=seed) for seed in range(seeds)]
    return configs


def _bn_layer(config: TrainConfig):
    return config.bn_layer() if config.batch_norm else None


def variant_of(config: dict) -> str:
    """Which of VARIANTS a saved config (`TrainConfig.to_dict`'s form) is."""
    layer = _bn_layer(TrainConfig.from_dict(config))
    for variant in VARIANTS:
        batch_norm, bn = variant_bn(variant)
        if layer == (TrainConfig(batch_norm=True, bn=bn).bn_layer() if batch_norm else None):
            return variant
    raise ValueError(f"not a net of this study: {config['bn']!r}")


def part_of(config: dict) -> str:
    """Which of PARTS a saved config belongs to."""
    return next(part.name for part in PARTS if (config["optimizer"], config["learning_rate"], config["activation"])
                == (part.optimizer, part.learning_rate, part.activation))


def without_noise(config: TrainConfig) -> TrainConfig:
    """The same run with its NoisyBatchNorm layers' noise set to zero."""
    layer = _bn_layer(config)
    return dataclasses.replace(config, bn=layer.without_noise()) if isinstance(layer, NoisyBatchNorm) else config


def layer_groups(params: dict) -> list[tuple[str, ...]]:
    """The net's layers input side first, each with the normalization after
    it (the k-th BN-like layer belongs to the k-th Conv/Dense):
    [("Conv_0", "BatchNorm_0"), ...]."""
    index = lambda name: int(name.rsplit("_", 1)[1])  # noqa: E731
    layers = sorted((n for n in params if re.fullmatch(r"(Conv|Dense)_\d+", n)),
                    key=lambda n: (not n.startswith("Conv"), index(n)))
    norms = sorted((n for n in params if "BatchNorm" in n), key=lambda n: (n.startswith("BatchNorm"), index(n)))
    return [(layer, *norms[position:position + 1]) for position, layer in enumerate(layers)]


def _variables(state, params=None) -> dict:
    return {"params": state.params if params is None else params,
            **({"batch_stats": state.batch_stats} if state.batch_stats is not None else {})}


def _train_mode(state, images, params=None):
    """Logits in train mode (batch statistics, noise on), the statistics' update dropped."""
    mutable = ["batch_stats"] if state.batch_stats is not None else False
    out = state.apply_fn(_variables(state, params), images, train=True, mutable=mutable)
    return out[0] if mutable else out


def _loss(state, images, labels):
    """loss(params): the train-mode loss on the probe batch."""
    return lambda params: cross_entropy_loss(_train_mode(state, images, params), labels)


def _hidden_inputs(state, images) -> dict:
    """What each layer but the first reads, in train mode (noise included)."""
    inputs = layer_inputs(lambda: _train_mode(state, images))
    return {name: value for name, value in inputs.items() if name != "Conv_0"}


def _in_batches(state, images, labels) -> dict:
    """Loss and accuracy over `images` in batches of CHECK_BATCH, each
    normalized by its own statistics (train mode, nothing updated)."""
    batches = images.reshape(-1, CHECK_BATCH, *images.shape[1:])
    logits = jax.vmap(lambda batch: _train_mode(state, batch))(batches).reshape(len(images), -1)
    return {"loss": cross_entropy_loss(logits, labels), "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def _layer_moments(before: dict, after: dict) -> dict:
    """Per hidden layer: the input's mean shift over the step and its unit 0's mean and std (before)."""
    values = {}
    for name, value in before.items():
        unit = value[..., 0]
        values.update({f"mean_shift/{name}": moments_shift(value, after[name])["mean_shift"],
                       f"unit_mean/{name}": unit.mean(), f"unit_std/{name}": unit.std()})
    return values


@jax.jit
def measure(state, quiet_state, probe: tuple, checks: tuple, step_sizes) -> dict:
    """The module doc's measurements at `state` (`quiet_state`: the same
    variables, noise off), over one optimizer step on the probe batch."""
    images, labels = probe
    next_state, _ = train_step_body(state, images, labels)
    shifts = gradient_shift(_loss(state, images, labels), state.params, next_state.params,
                            layer_groups(state.params))
    line = gradient_line(_loss(state, images, labels), state.params, step_sizes)
    (train_images, train_labels), (test_images, test_labels) = checks
    noisy, quiet = _in_batches(state, train_images, train_labels), _in_batches(quiet_state, train_images, train_labels)
    values = {"loss_spread": line["loss_spread"], "max_gradient_change": line["max_gradient_change"],
              "beta": line["beta"], "grad_norm": line["grad_norm"],
              "train_loss_noise_on": noisy["loss"], "train_accuracy_noise_on": noisy["accuracy"],
              "train_loss_noise_off": quiet["loss"], "train_accuracy_noise_off": quiet["accuracy"],
              "test_accuracy_noise_off": _in_batches(quiet_state, test_images, test_labels)["accuracy"],
              **_layer_moments(_hidden_inputs(state, images), _hidden_inputs(next_state, images))}
    for name, shift in shifts.items():
        values.update({f"ics_l2/{name}": shift["l2"], f"ics_cosine/{name}": shift["cosine"],
                       f"ics_relative/{name}": shift["relative"]})
    return values


def _fixed_images(images, labels, count: int, seed: int | None):
    """`count` images (at most the set's, in whole batches of CHECK_BATCH):
    the first, or a random choice of `seed`."""
    count = min(count, len(images) // CHECK_BATCH * CHECK_BATCH)
    chosen = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(len(images))[:count]
    return to_float_images(jnp.asarray(images[chosen])), jnp.asarray(labels[chosen])


def landscape_probe(config: TrainConfig, data):
    """The probe of each run (`make_probe` of the sweep): `measure` on fixed images."""
    probe = _fixed_images(data.x_train, data.y_train, PROBE_BATCH, seed=0)
    checks = (_fixed_images(data.x_train, data.y_train, CHECK_TRAIN, seed=1),
              _fixed_images(data.x_test, data.y_test, CHECK_TEST, seed=None))
    quiet_apply = ModelApply(make_model(without_noise(config)))
    step_sizes = jnp.asarray(STEP_SIZES, jnp.float32) * config.learning_rate

    def probe_state(state) -> dict:
        measured = measure(state, state.replace(apply_fn=quiet_apply), probe, checks, step_sizes)
        return {key: float(value) for key, value in measured.items()}
    return probe_state


def probe_at_start(config: TrainConfig, history, state, data) -> dict:
    """The probe at step 0 (`run_sweep`'s `measure`): the run's initial state, rebuilt from its seed."""
    return {"probe_at_start": landscape_probe(config, data)(create_train_state(config, jax.random.key(config.seed)))}


def main(argv=None) -> None:
    parser = OneLineArgumentParser(description="the article's explanation of BN tested as Santurkar et al. "
                                               "(NeurIPS 2018) test it")
    parser.add_argument("--steps", type=positive_int, default=1000,
                        help="training steps of each relu run, evaluated and probed every steps/10 (default 1000)")
    add_sweep_flags(parser, seeds=5, epochs=None, study="why_bn_works")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 (verdicts are intervals over seeds), got {args.seeds}")
    output_folder(args, "why_bn_works")
    steps = min(args.steps, args.max_steps or args.steps)
    configs = [dataclasses.replace(config, max_steps=min(config.max_steps, args.max_steps or config.max_steps))
               for config in study_configs(steps, args.seeds)]
    results_path = args.out / "results.json"
    run_sweep(configs, results_path, load_mnist, strategy=sweep_strategy(args), make_probe=landscape_probe,
              measure=probe_at_start, name="why_bn_works", **run_folders(args))
    deep_linear.run(args.out / "deep_linear.json", seeds=args.seeds, max_steps=args.max_steps)
    report(args.out)
    print(f"wrote the figures and summary.md to {args.out}", flush=True)


if __name__ == "__main__":
    run_resumable(main)
