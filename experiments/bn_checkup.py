"""The BN check-up (`bnjax.checkup`) on two models trained on MNIST: the
article's BN net (sigmoid, Adam lr 0.01, batch 32: the setting whose running
averages lag its weights) and a ResNet in the style of flax/examples/imagenet
with flax's own `nn.BatchNorm` (momentum 0.9, SGD with momentum), to show the
check-up on a model bnjax did not build.

    python -m experiments.bn_checkup                       # prints both reports
    python -m experiments.bn_checkup --out outputs/bn_checkup --steps 600   # and writes report.md

Each check-up re-estimates the statistics from 200 training batches of 32 and
scores the 10,000 test images. On 2 CPU cores, about 30 s at 600 steps.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax
from bnjax.support.checks import OneLineArgumentParser
from bnjax.data.datasets import load_mnist
from bnjax.support.atomic import atomic_write
from bnjax.support.provenance import describe_environment, environment
from bnjax.training.config import TrainConfig
from bnjax.training.steps import model_of, to_float_images
from bnjax.training.train import train


class ResidualBlock(nn.Module):
    filters: int
    norm: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(self.norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)  # each block starts as the identity
        if residual.shape != y.shape:
            residual = self.norm(name="norm_projection")(
                nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_projection")(residual))
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """A small ResNet in the style of flax/examples/imagenet: its norm is
    handed in as one value (`nn.BatchNorm`, or `bnjax.BatchNorm` in its place)."""

    norm: Callable = nn.BatchNorm
    stage_sizes: tuple[int, ...] = (1, 1)
    num_filters: int = 8
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype)
        x = nn.Conv(self.num_filters, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                x = ResidualBlock(self.num_filters * 2**stage, norm, strides)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def sgd_train_step(model):
    """(step, optimizer): a jitted train step of `model` (SGD, lr 0.1, momentum
    0.9), (variables, optimizer_state, images, labels) -> (variables, optimizer_state)."""
    optimizer = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(variables, optimizer_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply({**variables, "params": params}, images, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        changes, optimizer_state = optimizer.update(grads, optimizer_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], changes), **updates}, optimizer_state

    return step, optimizer


def train_resnet(data, steps: int, seed: int = 0):
    """The ResNet trained `steps` steps of batch 32 (SGD, lr 0.1, momentum 0.9)."""
    model = ResNet()
    images = to_float_images(jnp.asarray(data.x_train[:32]))
    variables = model.init(jax.random.key(seed), images, train=False)
    step, optimizer = sgd_train_step(model)
    optimizer_state = optimizer.init(variables["params"])
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    for index in range(steps):
        chosen = order[index * 32 % len(order):][:32]
        variables, optimizer_state = step(variables, optimizer_state, to_float_images(jnp.asarray(data.x_train[chosen])),
                                          jnp.asarray(data.y_train[chosen]))
    return model, variables


def batches_of(data, seed: int = 0):
    """200 training batches of 32 (for precise statistics) and the test set in batches of 1000."""
    order = np.random.default_rng(seed).permutation(len(data.x_train))[:200 * 32]
    train_batches = [to_float_images(jnp.asarray(data.x_train[order[first:first + 32]]))
                     for first in range(0, len(order), 32)]
    eval_batches = [(to_float_images(jnp.asarray(data.x_test[first:first + 1000])), data.y_test[first:first + 1000])
                    for first in range(0, len(data.x_test), 1000)]
    return train_batches, eval_batches


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model (default 600)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write report.md into (default: print only)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    data = load_mnist()
    train_batches, eval_batches = batches_of(data)
    sections = []
    config = TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=0.01, max_steps=args.steps,
                         eval_every=args.steps)
    _, state = train(config, data)
    report = bnjax.checkup(model_of(state), {"params": state.params, "batch_stats": state.batch_stats},
                           train_batches, eval_batches, bnjax.accuracy, train_kwargs={"train": True},
                           eval_kwargs={"train": False})
    sections.append((f"The article's BN net (sigmoid, Adam lr 0.01, batch 32, {args.steps} steps)", report))
    model, variables = train_resnet(data, args.steps)
    report = bnjax.checkup(model, variables, train_batches, eval_batches, bnjax.accuracy,
                           train_kwargs={"train": True}, eval_kwargs={"train": False})
    sections.append((f"A ResNet with flax's nn.BatchNorm (momentum 0.9, SGD lr 0.1, batch 32, {args.steps} steps)",
                     report))
    text = "\n\n".join(f"## {title}\n\n```\n{report}\n```" for title, report in sections)
    print(text)
    if args.out is not None:
        command = "python -m experiments.bn_checkup " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out / "report.md", "w") as file:
            file.write(f"# BN check-up (`bnjax.checkup`)\n\nMade by `{command}` on {describe_environment(environment())}."
                       f"\n\n{text}\n")
        print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
