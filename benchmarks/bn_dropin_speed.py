"""Does bnjax's BatchNorm cost more than flax's in the same model? Steps per
second of one train step (the ResNet of experiments/bn_checkup.py at 32 x 32 x 3,
batch 32, SGD with momentum) with `norm=nn.BatchNorm` and with
`norm=bnjax.BatchNorm`, side by side in one run: the two compiled steps
alternate, round after round, so a busy machine slows both alike.

    python -m benchmarks.bn_dropin_speed [--rounds 10] [--steps 20]

Prints each model's steps/s (the median over rounds) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnjax
from experiments.bn_checkup import ResNet, sgd_train_step


def make_step(model, images, labels):
    """[step on this batch, initial variables, initial optimizer state]."""
    train_step, optimizer = sgd_train_step(model)
    variables = model.init(jax.random.key(0), images, train=False)
    return [lambda variables, optimizer_state: train_step(variables, optimizer_state, images, labels), variables,
            optimizer.init(variables["params"])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating timing rounds (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per model per round (default 20)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    images = jax.random.uniform(jax.random.key(1), (32, 32, 32, 3))
    labels = jnp.arange(32) % 10
    runs = {name: make_step(ResNet(norm=norm), images, labels)
            for name, norm in (("flax nn.BatchNorm", nn.BatchNorm), ("bnjax.BatchNorm", bnjax.BatchNorm))}
    for run in runs.values():  # compile and warm up
        run[1], run[2] = run[0](run[1], run[2])
        jax.block_until_ready(run[1])
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run[1], run[2] = run[0](run[1], run[2])
            jax.block_until_ready(run[1])
            rates[name].append(args.steps / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"ResNet train step, 32 x 32 x 3, batch 32, {jax.devices()[0].device_kind}, "
          f"{args.rounds} alternating rounds of {args.steps} steps (median steps/s):")
    for name, median in medians.items():
        print(f"  {name:20s} {median:8.1f} steps/s  (rounds: {min(rates[name]):.1f} - {max(rates[name]):.1f})")
    print(f"  bnjax / flax         {medians['bnjax.BatchNorm'] / medians['flax nn.BatchNorm']:8.3f}")


if __name__ == "__main__":
    main()
