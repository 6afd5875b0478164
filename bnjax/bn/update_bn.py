"""Precise BN for any linen model: its BN statistics re-estimated for its
current weights, what `torch.optim.swa_utils.update_bn(loader, model)` and
fvcore's `update_bn_stats` do for PyTorch.

    batch_stats = bnjax.update_bn(model, variables, batches, train=True)
    variables = {**variables, "batch_stats": batch_stats}

Every batch goes through the model in train mode (`model.apply(variables,
batch, mutable=["batch_stats"], **apply_kwargs)`, as the model's own train
step calls it); each BN layer's input is taken where the layer is called
(`flax.linen.intercept_methods`), so any model works whose BN layers are
bnjax's or flax's, however many and wherever they sit. Each layer's mean
and variance are then the equal-weight averages over the batches:

    mean = (1/K) sum_k mean_k
    var  = (1/K) sum_k var_k                                   variance="batch_average"
    var  = (1/K) sum_k var_k + (1/K) sum_k (mean_k - mean)^2    variance="pooled"

(`precise_statistics` says why each; a bnjax layer with PyTorch's
`unbiased_running_var` takes N / (N - 1) x each batch's variance, as
PyTorch's update_bn does.) Each layer sees the layers below it normalized by
the batch's own statistics, as in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax.bn.batchnorm import BatchNorm, batch_statistics, canonical_axes
from bnjax.support.checks import check_choice

VARIANCES = ("batch_average", "pooled")
BN_LAYERS = (nn.BatchNorm, BatchNorm)


def check_variance(variance: str) -> None:
    check_choice("variance", variance, VARIANCES)


def layer_statistics(module, x, mask=None):
    """The batch mean and variance a BN layer `module` (bnjax's or flax's)
    normalizes `x` with in train mode, and records (PyTorch's N / (N - 1)
    for a bnjax layer with unbiased_running_var)."""
    feature_axes = canonical_axes(x.ndim, module.axis)
    reduction_axes = tuple(axis for axis in range(x.ndim) if axis not in feature_axes)
    mean, var = batch_statistics(x, reduction_axes=reduction_axes, use_fast_variance=module.use_fast_variance,
                                 mask=mask, dtype=module.dtype,
                                 force_float32_reductions=module.force_float32_reductions)
    if getattr(module, "unbiased_running_var", False):
        values = 1
        for axis in reduction_axes:
            values *= x.shape[axis]
        var = var * (values / max(values - 1, 1))
    return mean, var


def in_eval_mode(module, args, kwargs) -> bool:
    """Whether a BN layer's call (its `args` and `kwargs` as intercepted) is
    in eval mode: use_running_average True, at the call or in the layer."""
    at_call = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return bool(module.use_running_average if at_call is None else at_call)


def refuse_eval_mode(module, args, kwargs) -> None:
    """A one-line ValueError when a BN layer runs in eval mode in update_bn's
    pass: the layers above it would see other inputs than in training, and
    the re-estimated statistics would silently follow the running averages.
    (A frozen layer normalizes with its running statistics in train mode
    too, as in training: that is no error.)"""
    if in_eval_mode(module, args, kwargs):
        raise ValueError(f"update_bn runs the model in train mode, but its BN layer {'/'.join(module.path)} ran in "
                         "eval mode (use_running_average=True): pass the model's train-mode argument, "
                         "update_bn(..., train=True) or checkup(..., train_kwargs={'train': True})")


def statistics_by_layer(model, variables, batch, **apply_kwargs) -> dict:
    """{path of each BN layer: (batch mean, batch variance)} for one batch."""
    found = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, BN_LAYERS):
            refuse_eval_mode(module, args, kwargs)
            if module.path in found:
                raise ValueError(f"BN layer {'/'.join(module.path)} is called more than once in one forward pass; "
                                 "update_bn takes each layer's statistics from one call")
            found[module.path] = layer_statistics(module, args[0], kwargs.get("mask"))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, batch, mutable=["batch_stats"], **apply_kwargs)
    return found


def gather(batches, statistics_of) -> dict:
    """{layer: [its statistics from each batch]}, from `statistics_of(batch)` -> {layer: statistics}."""
    per_layer: dict = {}
    for batch in batches:
        for layer, statistics in statistics_of(batch).items():
            per_layer.setdefault(layer, []).append(statistics)
    return per_layer


def average(per_batch: list, variance: str):
    """Equal-weight averages of a layer's per-batch (mean, var) pairs."""
    means = jnp.stack([mean for mean, _ in per_batch])
    variances = jnp.stack([var for _, var in per_batch])
    mean, var = means.mean(axis=0), variances.mean(axis=0)
    if variance == "pooled":
        var = var + jnp.square(means - mean).mean(axis=0)
    return mean, var


def update_bn(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any], *,
              variance: str = "batch_average", **apply_kwargs: Any) -> dict:
    """Precise BN statistics of `model` (a linen Module) with `variables`,
    from `batches` (any iterable of what the model takes as its first
    argument: arrays or pytrees). `apply_kwargs` put the model in train mode
    as its own train step does (e.g. `train=True`).

    Args:
      model: a linen Module with bnjax's or flax's BatchNorm layers.
      variables: its variables ({"params": ..., "batch_stats": ...}).
      batches: the inputs the statistics are estimated from.
      variance: how the batches' variances are combined: "batch_average"
        (their mean) or "pooled" (plus the spread of their means).
      **apply_kwargs: what `model.apply` needs for train mode (`train=True`).

    Returns:
      A new `batch_stats`, each BN layer's `mean` and `var` replaced; the
      rest (a rule's update `count`, Batch Renorm's averages) as they were."""
    check_variance(variance)
    if "batch_stats" not in variables:
        raise ValueError("update_bn needs a model with BN layers; these variables have no batch_stats")
    one_batch = jax.jit(lambda variables, batch: statistics_by_layer(model, variables, batch, **apply_kwargs))
    per_layer = gather(batches, lambda batch: one_batch(variables, batch))
    if not per_layer:
        raise ValueError("update_bn found no batches to average (an empty iterable), or no BN layer was called")
    batch_stats = jax.tree_util.tree_map(lambda leaf: leaf, variables["batch_stats"])  # a copy of the containers
    for path, per_batch in per_layer.items():
        layer = batch_stats
        for name in path:
            layer = layer[name]
        layer["mean"], layer["var"] = average(per_batch, variance)
    return batch_stats
