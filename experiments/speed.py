"""Training throughput of the plain and BN nets through the public `train` API.

    python -m experiments.speed [--steps 1000] [--repeats 3]

Steady-state train steps/s, compile time excluded: each measurement trains a
short run (100 steps) and a long one (100 + --steps) from the same config and
divides the extra steps by the extra training time (evaluation time excluded).
Plain and BN alternate, so both see the same machine noise; the median is
printed. Numbers on a busy machine are meaningless: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax

from bnjax.data import load_mnist
from bnjax.train import TrainConfig, train

WARMUP_STEPS = 100


def training_seconds(config: TrainConfig, data) -> float:
    history, _ = train(config, data)
    return history.total_wall_time_s - history.eval_time_s


def steps_per_second(config: TrainConfig, data, steps: int) -> float:
    short = training_seconds(dataclasses.replace(config, max_steps=WARMUP_STEPS), data)
    long = training_seconds(dataclasses.replace(config, max_steps=WARMUP_STEPS + steps), data)
    return steps / (long - short)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="train steps/s of the plain and BN nets")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be positive, got {args.steps} and {args.repeats}")
    data = load_mnist()
    rates = {False: [], True: []}
    for _ in range(args.repeats):
        for batch_norm in (False, True):
            config = TrainConfig(batch_norm=batch_norm, activation="relu", eval_every=10**9)
            rates[batch_norm].append(steps_per_second(config, data, args.steps))
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}, batch 32")
    for batch_norm, label in ((False, "plain"), (True, "BN")):
        values = ", ".join(f"{rate:.0f}" for rate in rates[batch_norm])
        print(f"{label:5s}: {statistics.median(rates[batch_norm]):.0f} train steps/s (median of {values})")


if __name__ == "__main__":
    main()
