"""A quick diagnostic of launch strategies: steps per dispatch for one run, and
steps per dispatch x runs per vmapped program, in steady state (each length run
once to compile, then timed once; compile excluded).

    python benchmarks/dispatch_diagnostic.py     # from the repository root

Single samples: on a GPU, 500 steps take well under a second, about the size of
the setup noise of one `train()` call, so these rates are rough (it printed a
negative rate once on an H100). Made for docs/performance.md; the end-to-end
figures there come from benchmarks/stacked_runs.py.
"""
import dataclasses
import time

from bnjax.data import load_mnist
from bnjax.engine import Strategy, train_many
from bnjax.train import TrainConfig, train
data = load_mnist()
def steady(f, short=100, long=600):
    f(short); f(long)  # compile every chunk length both runs use
    a = f(short); b = f(long); return (long - short) / (b - a)
def one_run(strategy, bn):
    def f(steps):
        h, _ = train(TrainConfig(batch_norm=bn, max_steps=steps, eval_every=10**9), data, strategy=strategy)
        return h.total_wall_time_s - h.eval_time_s
    return steady(f)
for name, st in [("1 step/dispatch", Strategy(steps_per_dispatch=1)), ("scan10", Strategy(steps_per_dispatch=10)), ("scan100", Strategy(steps_per_dispatch=100))]:
    for bn in (False, True):
        print(f"one run, {name}, bn={bn}: {one_run(st, bn):.0f} steps/s", flush=True)
for runs in (16, 64):
    for k in (1, 10, 100):
        configs = [TrainConfig(batch_norm=True, seed=s, eval_every=10**9) for s in range(runs)]
        st = Strategy(steps_per_dispatch=k, models_per_program=runs)
        def f(steps):
            cs = [dataclasses.replace(c, max_steps=steps) for c in configs]
            t = time.perf_counter(); out = train_many(cs, data, strategy=st); return time.perf_counter() - t - out[0][0].eval_time_s
        r = steady(f)
        print(f"{runs} BN runs in one program, {k} steps/dispatch: {r:.0f} program steps/s = {r*runs:.0f} run-steps/s", flush=True)
