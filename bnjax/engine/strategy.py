"""How a run is launched, as data: steps per dispatch, models per program,
evaluation pieces and worker processes; the fastest known per backend.

A `Strategy` never changes what is computed, only how it is launched (and
so the order of float32 operations: the engine's tests hold every strategy
to the per-step History within stated round-off):
  * steps_per_dispatch: 1 = one jitted step per Python dispatch; K > 1 = up to
    K steps (never past an evaluation) in one `lax.scan`.
  * unroll: unroll that scan. On XLA:CPU a rolled loop keeps the backward
    convolutions in a generic, much slower form; unrolling avoids it at the
    price of compile time.
  * models_per_program: `train_many` trains up to this many runs that share
    an architecture (they may differ in seed and learning rate) as one
    `vmap`ped program.
  * eval_chunk: evaluate each test batch as a `lax.map` over pieces of this
    many images (None: the whole batch at once). Eval mode treats each
    example alone, so only the loss sum's round-off can change.
  * parallel_runs: `train_many` trains up to this many runs (or programs) at
    once, each in its own worker process pinned to one CPU core. On a small
    CPU a batch-32 step cannot keep every core busy, so two runs on one core
    each get more done than two runs one after the other on both.
  * stacked_conv: how a program of several stacked runs computes its
    convolutions: "lax" (XLA's convolution, which `vmap`
    over runs turns into one grouped convolution) or "matmul" (patches and
    one batched matrix product over the runs axis). A program of one run
    always uses "lax".
  * await_each_dispatch: wait for each dispatch to finish before queuing the
    next. XLA:CPU runs several CPU devices' programs on one shared thread
    pool; with hundreds of multi-device steps queued by asynchronous dispatch,
    some devices can wait in one step's all-reduce while the others cannot
    get threads, and XLA aborts after 40 s (seen with 8 simulated devices on
    2 cores at 300 queued steps, never when each step is awaited). GPUs and
    TPUs keep dispatching ahead.

`default_strategy(platform, num_devices)` is the fastest measured per backend
(the figures and their commands: docs/performance.md). On CPU a batch-32
step cannot keep two cores busy and XLA:CPU's stacked and rolled programs
are slower: one step per dispatch, one model per program, evaluation in
pieces of 200 images (they stay in cache) and one run per core side by side.
On a GPU, where launching dominates at batch 32: many steps per dispatch
and many models per program. On a TPU: many steps per dispatch, one run per
program (`TPU_STRATEGY`, chosen from the TPU compiler's cost figures).
"""

from __future__ import annotations

import dataclasses

import jax

from bnjax.nets.conv import CONV_IMPLEMENTATIONS
from bnjax.support import host
from bnjax.support.checks import check_bool, check_choice, check_integer
from bnjax.training.evaluation import default_eval_chunk


@dataclasses.dataclass(frozen=True)
class Strategy:
    steps_per_dispatch: int = 1
    unroll: bool = False
    models_per_program: int = 1
    eval_chunk: int | None = None
    parallel_runs: int = 1
    await_each_dispatch: bool = False
    stacked_conv: str = "lax"

    def __post_init__(self):
        for name in ("steps_per_dispatch", "models_per_program", "parallel_runs"):
            check_integer(name, getattr(self, name))
        check_integer("eval_chunk", self.eval_chunk, optional=True)
        for name in ("unroll", "await_each_dispatch"):
            check_bool(name, getattr(self, name))
        check_choice("stacked_conv", self.stacked_conv, CONV_IMPLEMENTATIONS)


def default_strategy(platform: str | None = None, num_devices: int = 1) -> Strategy:
    """The fastest strategy known for `platform` ("cpu", "gpu", "tpu"; default:
    JAX's default backend) and a run over `num_devices` devices."""
    platform = platform or jax.default_backend()
    if platform == "cpu" and num_devices > 1:  # simulated devices share the cores: one step at a time, awaited
        return Strategy(steps_per_dispatch=1, models_per_program=1, eval_chunk=default_eval_chunk(platform),
                        await_each_dispatch=True)
    if platform == "cpu":
        return Strategy(steps_per_dispatch=1, unroll=False, models_per_program=1,
                        eval_chunk=default_eval_chunk(platform), parallel_runs=host.usable_core_count() or 1)
    if platform == "tpu":
        return TPU_STRATEGY
    return Strategy(steps_per_dispatch=100, unroll=False, models_per_program=64,
                    eval_chunk=default_eval_chunk(platform), stacked_conv="matmul")


# On a TPU, chosen from what the TPU compiler reports rather than from a
# measurement (no TPU has been at hand): `python -m benchmarks.tpu_programs`
# compiles the engine's interval program for a v5e with R = 1 .. 64 stacked
# BN runs, both convolutions, and prices each per run-step at the chip's
# published HBM bandwidth (every program is memory-bound there). Stacking
# adds HBM traffic in proportion to the runs (lax: 0.305 ms per run-step
# alone, 0.310 at R = 4, 0.393 at R = 64; matmul: 0.46-0.64), so a program
# trains one run, its convolutions XLA's own; the test set goes through
# in whole batches (2.9 ms projected against 5.4 in pieces of 200).
# outputs/benchmarks/tpu_programs.json holds every figure ("strategy_choice"),
# and tests/test_tpu_programs.py prices the choice again beside its neighbours.
TPU_STRATEGY = Strategy(steps_per_dispatch=100, unroll=False, models_per_program=1, eval_chunk=None,
                        parallel_runs=1, stacked_conv="lax")
