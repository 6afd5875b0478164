"""A quick diagnostic of launch strategies: steps per dispatch for one run, and
steps per dispatch x runs per vmapped program, in steady state (each length run
once to compile, then timed once; compile excluded).

    python -m benchmarks.dispatch_diagnostic

Single samples: on a GPU, 500 steps take well under a second, about the size of
the setup noise of one `train()` call, so these rates are rough (it printed a
negative rate once on an H100). Made for docs/performance.md; the end-to-end
figures there come from benchmarks/stacked_runs.py.
"""

from __future__ import annotations

import time

from bnjax.data.datasets import load_mnist
from bnjax.engine.launch import train_many
from bnjax.engine.strategy import Strategy
from bnjax.training.config import TrainConfig
from bnjax.training.train import train


def steady_steps_per_s(seconds_of, short: int = 100, long: int = 600) -> float:
    """Steps/s from the extra time of a `long` run over a `short` one, both run
    once before timing so that what they compile is compiled before the clock starts."""
    seconds_of(short)
    seconds_of(long)
    short_s = seconds_of(short)
    long_s = seconds_of(long)
    return (long - short) / (long_s - short_s)


def one_run_steps_per_s(data, strategy: Strategy, batch_norm: bool) -> float:
    def seconds_of(steps):
        history, _ = train(TrainConfig(batch_norm=batch_norm, max_steps=steps, eval_every=10**9), data,
                           strategy=strategy)
        return history.total_wall_time_s - history.eval_time_s
    return steady_steps_per_s(seconds_of)


def program_steps_per_s(data, runs: int, steps_per_dispatch: int) -> float:
    """Steps/s of one vmapped program of `runs` BN runs (seeds 0..runs-1)."""
    strategy = Strategy(steps_per_dispatch=steps_per_dispatch, models_per_program=runs)

    def seconds_of(steps):
        configs = [TrainConfig(batch_norm=True, seed=seed, max_steps=steps, eval_every=10**9) for seed in range(runs)]
        start = time.perf_counter()
        outcomes = train_many(configs, data, strategy=strategy)
        return time.perf_counter() - start - outcomes[0][0].eval_time_s
    return steady_steps_per_s(seconds_of)


def main() -> None:
    data = load_mnist()
    for name, strategy in [("1 step/dispatch", Strategy(steps_per_dispatch=1)),
                           ("scan10", Strategy(steps_per_dispatch=10)),
                           ("scan100", Strategy(steps_per_dispatch=100))]:
        for batch_norm in (False, True):
            rate = one_run_steps_per_s(data, strategy, batch_norm)
            print(f"one run, {name}, bn={batch_norm}: {rate:.0f} steps/s", flush=True)
    for runs in (16, 64):
        for steps_per_dispatch in (1, 10, 100):
            rate = program_steps_per_s(data, runs, steps_per_dispatch)
            print(f"{runs} BN runs in one program, {steps_per_dispatch} steps/dispatch: {rate:.0f} program steps/s "
                  f"= {rate * runs:.0f} run-steps/s", flush=True)


if __name__ == "__main__":
    main()
