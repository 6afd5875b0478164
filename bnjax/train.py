"""Train one run: `train(config, data)`, the one-run case of the training loop
(bnjax/loop.py), and the names a reader of one run needs.

    from bnjax.train import TrainConfig, train
    history, state = train(TrainConfig(batch_norm=True), load_mnist())

Where the pieces live: the config in bnjax/config.py; the model, state, train
step and eval step in bnjax/steps.py; which examples each step sees in
bnjax/schedule.py; the loop (R runs, K steps per dispatch, a device mesh,
evaluation, probes, checkpoints) in bnjax/loop.py; many runs (vmapped
programs, worker processes) in bnjax/engine.py.
"""

from __future__ import annotations

from typing import Callable

from bnjax.config import MODELS, OPTIMIZERS, TrainConfig
from bnjax.evaluation import evaluate
from bnjax.loop import EvalCallback, History, train_runs
from bnjax.schedule import check_dataset, epoch_order, resolve_steps
from bnjax.steps import (
    DATA_AXIS,
    TrainState,
    create_train_state,
    cross_entropy_loss,
    eval_step,
    make_mesh,
    make_model,
    make_optimizer,
    to_float_images,
    train_step,
    train_step_body,
)
from bnjax.strategy import Strategy

__all__ = [
    "DATA_AXIS", "MODELS", "OPTIMIZERS", "EvalCallback", "History", "TrainConfig", "TrainState", "check_dataset",
    "create_train_state", "cross_entropy_loss", "epoch_order", "eval_step", "evaluate",
    "make_mesh", "make_model", "make_optimizer", "resolve_steps", "to_float_images", "train", "train_step",
    "train_step_body",
]


def train(
    config: TrainConfig,
    data,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | None = None,
    probe: Callable[[TrainState], dict] | None = None,
    strategy: Strategy | None = None,
) -> tuple[History, TrainState]:
    """Train one model on `data` (a `bnjax.data.Dataset`) and evaluate it on the
    test set every `config.eval_every` steps and at the end; return
    (history, final_state).

    `on_eval(config, step, total_steps, record)` is called after each
    evaluation (for progress output). A run whose training loss diverges (NaN,
    infinite or above `bnjax.loop.DIVERGED_LOSS`) stops there and is marked
    `diverged`.

    With `checkpoint_path`, the whole run (state, history, config) is saved
    there after every evaluation, and a run started with an existing checkpoint
    resumes from it: an interrupted run reaches the same History as an
    uninterrupted one.

    `probe(state) -> dict of floats`, if given, is measured at every evaluation
    and kept in `history.probes` (e.g. percentiles of a unit's input).

    `strategy` (a `bnjax.strategy.Strategy`; default: the fastest known for the
    devices used, `bnjax.strategy.default_strategy`) sets how many steps run
    per dispatch and the pieces each test batch is evaluated in. It never
    changes what is computed, only how it is launched (tests/test_engine.py
    holds every strategy to the per-step results).
    """
    [(history, state)] = train_runs([config], data, strategy, on_eval, probes=[probe],
                                    checkpoint_paths=[checkpoint_path])
    return history, state
