"""Precise BN: BN's statistics re-estimated for the current weights.

    batch_stats = recompute_batch_stats(state, data.x_train, batch_size=32, num_batches=200)
    evaluate(state.replace(batch_stats=batch_stats), test_images, test_labels)

The running averages that eval mode uses are averages over the last ~1 / (1 -
momentum) training steps, made while the weights moved; at high learning
rates they lag the weights (docs/results.md, "Train mode vs. test mode").
Precise BN (fvcore's `update_bn_stats`, `torch.optim.swa_utils.update_bn`,
detectron2's PreciseBN hook; Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021) freezes the weights, runs `num_batches` training batches
through the net in train mode and replaces the running statistics with the
equal-weight mean of what each batch gave:

    mean = (1/K) sum_k mean_k
    var  = (1/K) sum_k var_k                      variance="batch_average" (default)
    var  = (1/K) sum_k var_k + (1/K) sum_k (mean_k - mean)^2   variance="pooled"

"batch_average" is what fvcore and PyTorch compute (with PyTorch's N / (N - 1)
per batch when the net mirrors PyTorch) and what train mode normalizes with on
average: each batch by its own variance. "pooled" is the variance of all K x B
values at once (the law of total variance; exact for biased batch variances),
larger by the spread of the batch means. Layer by layer, each BN sees the
outputs of the layers below it under their *batch* statistics, as in training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.bn.update_bn import check_variance
from bnjax.nets.models import bn_of
from bnjax.support.checks import check_integer
from bnjax.training.steps import model_of, to_float_images



def statistics_of_each_batch(model, variables, batches):
    """Each batch's BN mean and variance, layer by layer: a `batch_stats`-shaped
    tree whose leaves have a leading axis of K, for `batches` (K, B, ...) floats.
    `model` is a bnjax ConvNet or MLP; with BN momentum 0 its train-mode update
    of the running statistics is exactly the batch's statistics (on one device:
    a model built for a mesh averages over no axis here; a frozen BN thaws
    here; ghost batches are not split: these are the statistics of whole
    batches, an estimate of the population's; under Batch Renorm the layers below keep their r and d corrections,
    as in training)."""
    bn = bn_of(model).clone(momentum=0.0, running_average="ema", axis_name=None, frozen=False,
                                        ghost_batch_size=None)
    one_batch = model.clone(bn=bn)

    def statistics_of(batch):
        _, updates = one_batch.apply(variables, batch, train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    return jax.lax.map(statistics_of, batches)


def average_statistics(per_batch, variance: str = "batch_average"):
    """The equal-weight average of per-batch statistics (module doc)."""
    check_variance(variance)

    def layer_average(stats):
        mean = stats["mean"].mean(axis=0)
        var = stats["var"].mean(axis=0)
        if variance == "pooled":
            var = var + jnp.square(stats["mean"] - mean).mean(axis=0)
        return {"mean": mean, "var": var}

    return {layer: layer_average(stats) for layer, stats in per_batch.items()}


@functools.partial(jax.jit, static_argnames=("model", "variance"))
def precise_statistics(model, params, batch_stats, batches, variance: str = "batch_average"):
    """Precise BN's `mean` and `var` per BN layer for `model` with `params`,
    from `batches` (K, B, ...) of float images already on the device."""
    per_batch = statistics_of_each_batch(model, {"params": params, "batch_stats": batch_stats}, batches)
    return average_statistics(per_batch, variance)



def sample_batches(images, batch_size: int, num_batches: int, seed: int | None = 0):
    """`num_batches` batches of `batch_size` of `images` ((N, 28, 28, 1) uint8)
    as (K, B, 28, 28, 1) floats on the device: drawn without replacement with
    `seed`, or the first ones in order with `seed=None`."""
    check_integer("batch_size", batch_size)
    check_integer("num_batches", num_batches)
    needed = batch_size * num_batches
    if needed > len(images):
        raise ValueError(f"num_batches {num_batches} x batch_size {batch_size} = {needed} images; "
                         f"only {len(images)} given")
    chosen = np.arange(needed) if seed is None else np.random.default_rng(seed).permutation(len(images))[:needed]
    return to_float_images(jnp.asarray(np.asarray(images)[chosen])).reshape(num_batches, batch_size,
                                                                            *images.shape[1:])


def recompute_batch_stats(state, images, batch_size: int = 32, num_batches: int = 200,
                          variance: str = "batch_average", seed: int | None = 0):
    """Precise BN statistics for `state`'s current weights (a TrainState of a
    bnjax ConvNet or MLP with BN), from `num_batches` batches of `batch_size`
    of `images` ((N, 28, 28, 1) uint8, e.g. `data.x_train`): drawn without
    replacement with `seed`, or the first ones in order with `seed=None`.
    Returns a new `batch_stats` (for `state.replace(batch_stats=...)`); the
    state itself is not changed. A rule that keeps an update `count` keeps it."""
    if not state.batch_stats:
        raise ValueError("precise BN needs a model with BN; this state has no batch_stats")
    check_variance(variance)  # before the batches are copied
    batches = sample_batches(images, batch_size, num_batches, seed)
    precise = precise_statistics(model_of(state), state.params, state.batch_stats, batches, variance)
    return {layer: {**state.batch_stats[layer], **stats} for layer, stats in precise.items()}


def precise_batches_for(config, train_images):
    """The training batches precise BN re-estimates from at every evaluation
    of a run with `eval_statistics="precise"` (None otherwise): the config's
    `precise_bn_batches` batches of `batch_size`, drawn with seed 0 for every
    run, so that the curve moves with the weights only."""
    if config.eval_statistics != "precise":
        return None
    needed = config.precise_bn_batches * config.batch_size
    if needed > len(train_images):
        raise ValueError(f"precise_bn_batches {config.precise_bn_batches} x batch_size {config.batch_size} = "
                         f"{needed} training images; the training set has {len(train_images)}")
    return sample_batches(train_images, config.batch_size, config.precise_bn_batches, seed=0)
