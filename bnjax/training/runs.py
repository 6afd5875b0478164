"""The leading runs axis: R >= 1 runs of one program as one stacked state.

Every leaf of a stacked `TrainState` has a leading axis of R runs; the loop
(`train_runs`) and the evaluation (`evaluate_runs`) apply one run's
function to all R with `for_each_run`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnjax.training.steps import TrainState


@jax.jit
def stack_runs(states: list[TrainState]) -> TrainState:
    """States of runs of one program, stacked along a new leading runs axis.
    (`create_train_state` gives runs of one program one model and one
    optimizer object, so their states have one pytree structure.) Jitted:
    one program per model and number of runs, not one per array shape."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


@jax.jit
def run_of(state: TrainState, index) -> TrainState:
    """Run `index`'s own state, out of a stacked one (one program for every index)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], state)


def for_each_run(function, stacked, *shared):
    """`function(run, *shared)` for every run of `stacked` (leading runs axis):
    called directly on the one run when there is one, else vmapped."""
    if jax.tree_util.tree_leaves(stacked)[0].shape[0] == 1:
        return stack_runs([function(run_of(stacked, 0), *shared)])
    return jax.vmap(function, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
