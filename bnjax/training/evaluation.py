"""Test-set evaluation of R >= 1 stacked runs, with BN normalizing by one of
three kinds of statistics (`TrainConfig.eval_statistics`):

  running   eval mode: BN's running averages (what the article, Keras, Flax
            and PyTorch report; `val_accuracy` of every History);
  precise   eval mode with statistics re-estimated for the current weights
            (`precise_statistics`) from `precise_bn_batches` training batches;
  batch     train mode on each test batch of `eval_batch_size`: every batch
            normalized by its own statistics (Haiku's `test_local_stats=True`,
            Equinox's `mode="batch"`), or each ghost batch of it by its own
            under `ghost_batch_size`, as in training; the updated running
            averages are dropped.

One door for all three: `evaluate_runs(state, images, labels,
statistics=...)` for stacked runs, `evaluate` for one run's state.
"running" is always measured; both loops (`evaluate_timed`) record "precise" or
"batch" beside it when the config asks (`precise_val_accuracy`, ...).
`batch_statistics_accuracy` measures accuracy against the test batch size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bnjax.nets.models import bn_of
from bnjax.support.checks import check_choice
from bnjax.training.config import EVAL_STATISTICS
from bnjax.training.precise_bn import precise_statistics
from bnjax.training.runs import for_each_run, stack_runs
from bnjax.training.steps import DATA_AXIS, TrainState, eval_step, logits_totals, model_of, to_float_images

# On XLA:CPU test batches evaluated in pieces of this many images stay in
# cache and run faster than 1000 at once (docs/performance.md has the figures); GPUs
# and TPUs take the whole batch.
CPU_EVAL_CHUNK = 200


def default_eval_chunk(platform: str) -> int | None:
    """The pieces (`eval_step`'s `chunk`) a test batch is evaluated in on `platform`."""
    return CPU_EVAL_CHUNK if platform == "cpu" else None


# ---------------------------------------------------------------- running averages

def _eval_runs(state, images, labels, chunk):
    return for_each_run(functools.partial(eval_step, chunk=chunk), state, images, labels)


_eval_runs_jitted = jax.jit(_eval_runs, static_argnames="chunk")


def _totals_over_set(totals_of, images_uint8, labels, batch_size: int):
    """Summed totals of every run over a whole set, inside one program: the
    full batches of `batch_size` in a `lax.scan` that adds each batch's
    `totals_of(float_images, labels)` in order, then the smaller last batch
    if any (the order in which a loop over the batches would add them)."""
    def batch_totals(batch):
        images, batch_labels = batch
        return totals_of(to_float_images(images), batch_labels)

    num_full = labels.shape[0] // batch_size
    full = num_full * batch_size
    totals = None
    if num_full:
        batches = (images_uint8[:full].reshape(num_full, batch_size, *images_uint8.shape[1:]),
                   labels[:full].reshape(num_full, batch_size))
        one_batch = jax.eval_shape(batch_totals, jax.tree_util.tree_map(lambda x: x[0], batches))
        zeros = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), one_batch)
        totals, _ = jax.lax.scan(
            lambda sums, batch: (jax.tree_util.tree_map(jnp.add, sums, batch_totals(batch)), None), zeros, batches)
    if full < labels.shape[0]:
        last = batch_totals((images_uint8[full:], labels[full:]))
        totals = last if totals is None else jax.tree_util.tree_map(jnp.add, totals, last)
    return totals


@functools.partial(jax.jit, static_argnames=("batch_size", "chunk"))
def _running_totals(state, images_uint8, labels, batch_size, chunk):
    return _totals_over_set(functools.partial(_eval_runs, state, chunk=chunk), images_uint8, labels, batch_size)


def _means(totals, num_examples: int) -> dict[str, np.ndarray]:
    return {"loss": np.asarray(totals["loss_sum"], np.float64) / num_examples,
            "accuracy": np.asarray(totals["correct"], np.float64) / num_examples}


def _running_means(state: TrainState, images_uint8, labels, batch_size: int, mesh, chunk) -> dict[str, np.ndarray]:
    """Eval mode over the whole set: on one device in one dispatch; with a
    `mesh` of several devices each batch split over them, one dispatch per
    batch (eval is per example, so no statistics cross devices)."""
    if mesh is None or mesh.size == 1:
        return _means(_running_totals(state, images_uint8, labels, batch_size, chunk), len(labels))
    split = NamedSharding(mesh, P(DATA_AXIS))
    loss_sum, correct = 0.0, 0
    for first in range(0, len(labels), batch_size):
        batch = slice(first, first + batch_size)
        images, batch_labels = to_float_images(images_uint8[batch]), labels[batch]
        if len(batch_labels) % mesh.size == 0:
            totals = _eval_runs_jitted(state, *jax.device_put((images, batch_labels), split), chunk=None)
        else:
            totals = _eval_runs_jitted(state, images, batch_labels, chunk=chunk)
        loss_sum, correct = loss_sum + totals["loss_sum"], correct + totals["correct"]
    return _means({"loss_sum": loss_sum, "correct": correct}, len(labels))


# ---------------------------------------------------------------- precise statistics

@jax.jit
def _precise_batch_stats_of_runs(state: TrainState, batches):
    """Every run's precise BN statistics (`precise_statistics`, equal-weight
    average of per-batch means and variances) from `batches` (K, B, ...) of
    float images, as a stacked `batch_stats` (an update `count` is kept)."""
    def precise(run):
        stats = precise_statistics(model_of(run), run.params, run.batch_stats, batches)
        return {layer: {**run.batch_stats[layer], **layer_stats} for layer, layer_stats in stats.items()}
    return for_each_run(precise, state)


@functools.partial(jax.jit, static_argnames=("batch_size", "chunk"))
def _precise_totals(state, precise_batches, images_uint8, labels, batch_size, chunk):
    state = state.replace(batch_stats=_precise_batch_stats_of_runs(state, precise_batches))
    return _running_totals(state, images_uint8, labels, batch_size, chunk)


# ---------------------------------------------------------------- batch statistics

def _batch_statistics_totals(state, images, labels):
    def totals(run):
        # Statistics of this whole batch, on whichever devices hold it: the
        # model's cross-device axis (if any) is not bound outside shard_map;
        # a frozen BN, which would use its running statistics, thaws here.
        model = model_of(run)
        model = model.clone(bn=bn_of(model).clone(axis_name=None, frozen=False))
        logits, _ = model.apply({"params": run.params, "batch_stats": run.batch_stats}, images, train=True,
                                mutable=["batch_stats"])
        return logits_totals(logits, labels)
    return for_each_run(totals, state)


@functools.partial(jax.jit, static_argnames="batch_size")
def _batch_statistics_totals_over_set(state, images_uint8, labels, batch_size):
    return _totals_over_set(functools.partial(_batch_statistics_totals, state), images_uint8, labels, batch_size)


# ---------------------------------------------------------------- the doors

def evaluate_runs(state: TrainState, images_uint8, labels, batch_size: int = 1000, mesh=None,
                  chunk: int | None = None, *, statistics: str = "running",
                  precise_batches=None) -> dict[str, np.ndarray]:
    """Mean loss and accuracy of every run of a stacked `state` over a whole
    (device-resident) set of uint8 images, as arrays of R values, with BN
    normalizing by `statistics` (the module's three kinds). Batches of
    `batch_size` (the last one may be smaller); the whole set in one dispatch
    on one device. "precise" needs `precise_batches`: (K, B, ...) float
    training images on the device. `mesh` (several devices split each batch)
    and `chunk` (see `eval_step`) apply to eval mode, "running" and "precise"."""
    check_choice("eval_statistics", statistics, EVAL_STATISTICS)
    if statistics == "precise" and precise_batches is None:
        raise ValueError("eval_statistics 'precise' needs precise_batches, the training batches to estimate from")
    if statistics == "batch":
        return _means(_batch_statistics_totals_over_set(state, images_uint8, labels, batch_size), len(labels))
    if statistics == "precise" and (mesh is None or mesh.size == 1):  # statistics and test set in one dispatch
        return _means(_precise_totals(state, precise_batches, images_uint8, labels, batch_size, chunk), len(labels))
    if statistics == "precise":
        state = state.replace(batch_stats=_precise_batch_stats_of_runs(state, precise_batches))
    return _running_means(state, images_uint8, labels, batch_size, mesh, chunk)


def evaluate(state: TrainState, images_uint8, labels, batch_size: int = 1000, mesh=None,
             chunk: int | None = None, *, statistics: str = "running", precise_batches=None) -> dict[str, float]:
    """`evaluate_runs` for one run's own (unstacked) state: {"loss", "accuracy"}."""
    stacked = stack_runs([state])
    means = evaluate_runs(stacked, images_uint8, labels, batch_size, mesh, chunk, statistics=statistics,
                          precise_batches=precise_batches)
    return {key: float(values[0]) for key, values in means.items()}


@functools.partial(jax.jit, static_argnames="group_size")
def batch_statistics_accuracy(state, images_uint8, labels, group_size: int):
    """Test accuracy in train mode at any test batch size: the images are cut
    into groups of `group_size` (a remainder is dropped), and each group is
    normalized with its own statistics (each ghost batch of it by its own,
    under `ghost_batch_size`). The returned running averages are thrown away.
    One run (no runs axis). A door of its own beside `evaluate(statistics="batch")`
    because it measures something else: how accuracy depends on the test batch
    size (the eval-modes and rethinking-batch studies, from 1 to the
    whole test set), where a last smaller batch would mix two sizes."""
    if not 1 <= group_size <= labels.shape[0]:
        raise ValueError(f"test batch size {group_size} must be in [1, {labels.shape[0]}], the test set's size")
    n = labels.shape[0] // group_size * group_size
    groups = to_float_images(images_uint8[:n]).reshape(-1, group_size, *images_uint8.shape[1:])

    def logits_of(group):
        logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, group, train=True,
                                   mutable=["batch_stats"])
        return logits

    logits = jax.lax.map(logits_of, groups, batch_size=max(1, 1000 // group_size))
    return jnp.mean(jnp.argmax(logits.reshape(n, -1), -1) == labels[:n])
