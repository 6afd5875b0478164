"""Batch Normalization written out from the equations (Ioffe & Szegedy, 2015).

Two pure functions hold all of the math:

    batch_norm_train(x, scale, bias, running, average, epsilon, ...)
        -> (y, new_running)              running: {"mean", "var"}; average: RunningAverage
    batch_norm_eval(x, scale, bias, running_mean, running_var, ...) -> y

and a Flax linen module, `BatchNorm`, stores their state: `scale` and `bias`
in the `params` collection (learned by the optimizer), `mean` and `var` in the
`batch_stats` collection (running averages, updated only in train mode).

`BatchNorm` is a drop-in for `flax.linen.BatchNorm`: the same fields in the
same order with the same defaults (momentum 0.99, epsilon 1e-5), the same call
(`bn(x, use_running_average=..., mask=...)`) and the same variables, so
`partial(bnjax.BatchNorm, ...)` replaces `partial(nn.BatchNorm, ...)` in any
flax model and gives the same numbers. Beside flax's fields, keyword-only, the
variants, so that one file shows every way BN's state moves: the
running-average rules (`running_average_weights`), PyTorch's unbiased running
variance, Batch Renormalization (`batch_renorm_train`), frozen BN
(`BatchNorm(frozen=True)`) and ghost batches inside a device
(`ghost_batch_statistics`).

The feature axis is the last one by default (NHWC images, (batch, features)
vectors), as in Keras (`axis=-1`) and Flax; `axis` picks others (NCHW: 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.linen.dtypes import canonicalize_dtype

from bnjax.support.checks import check_bool, check_choice, check_integer, is_integer, is_real

# flax.linen.BatchNorm's defaults, which BatchNorm and the pure functions share.
DEFAULT_MOMENTUM = 0.99
DEFAULT_EPSILON = 1e-5
# Keras's defaults, which the article used: bnjax's own nets pass them
# explicitly (`keras_bn`). PyTorch's momentum=0.1 weights the *new* batch
# statistic; Keras and Flax weight the *old* running value, so PyTorch 0.1 is
# Keras/Flax 0.9.
KERAS_MOMENTUM = 0.99
KERAS_EPSILON = 1e-3
# How the running statistics average the batch statistics (running_average_weights).
RUNNING_AVERAGES = ("ema", "debiased_ema", "cumulative")


def canonical_axes(ndim: int, axes) -> tuple[int, ...]:
    """`axes` (an int or a sequence, negative counted from the end) as sorted non-negative axes of an ndim array."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted({axis + ndim if axis < 0 else axis for axis in axes}))


def reduction_axes_of(ndim: int, reduction_axes=None) -> tuple[int, ...]:
    """The axes BN's statistics reduce over: `reduction_axes` (an empty tuple
    too: every axis a feature axis, nothing reduced), or every axis but the
    last when None."""
    return tuple(range(ndim - 1)) if reduction_axes is None else canonical_axes(ndim, reduction_axes)


def broadcast_features(value, reduction_axes):
    """A per-feature value (mean, var, scale, ...) with a size-1 axis at each
    of `reduction_axes`, to broadcast against the input: as flax shapes them,
    so that the program, its gradient included, is flax's operation for
    operation (a (features,) vector broadcast implicitly gives the same
    outputs but another gradient program, off by round-off)."""
    return jnp.expand_dims(value, tuple(reduction_axes))


def _squared_magnitude(x):
    """|x|^2: x^2 for real x, re^2 + im^2 for complex x (the variance of a complex batch is real)."""
    if jnp.iscomplexobj(x):
        return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
    return jnp.square(x)


def _reduction_inputs(x, reduction_axes, mask, dtype, force_float32_reductions: bool):
    """(x in the statistics' dtype, the axes reduced, the mask as booleans or
    None): what every statistics function starts from. The dtype is x's or
    `dtype`, at least float32 with `force_float32_reductions`."""
    if dtype is None:
        dtype = jnp.result_type(x)
    if force_float32_reductions:
        dtype = jnp.promote_types(dtype, jnp.float32)
    x = jnp.asarray(x, dtype)
    return x, reduction_axes_of(x.ndim, reduction_axes), None if mask is None else jnp.asarray(mask, bool)


def batch_statistics(x, axis_name: str | None = None, *, reduction_axes=None, use_fast_variance: bool = True,
                     mask=None, axis_index_groups=None, dtype=None, force_float32_reductions: bool = True):
    """Mean and biased variance of `x` over `reduction_axes` (default: every
    axis but the last), as flax.linen.BatchNorm computes them.

    Returns two arrays of x's shape without the reduction axes, in at least
    float32 (`force_float32_reductions`; `dtype`: a wider minimum). With
    `axis_name` (inside `shard_map`/`pmap`), the statistics are those of the
    global batch across devices (or across `axis_index_groups` of them),
    assuming every device holds the same number of examples. `mask`: a
    boolean array broadcastable to `x`, the values that count.

    One pass (`use_fast_variance`, the default, as Flax and Keras):
    var = E[|x|^2] - |E[x]|^2, both moments in one sweep and one collective; in
    float32 it loses the variance when the mean is large against the spread
    (mean 1e4, std 1: E[x^2] ~ 1e8, whose float32 spacing is 8). Otherwise
    var = E[|x - E[x]|^2], a second sweep (and a second collective) after the
    mean, accurate there.
    """
    x, axes, where = _reduction_inputs(x, reduction_axes, mask, dtype, force_float32_reductions)

    def mean_of(value):
        return jnp.mean(value, axis=axes, where=where)

    def across_devices(*means):  # one collective for all of them
        if axis_name is None:
            return means
        return jax.lax.pmean(means, axis_name, axis_index_groups=axis_index_groups)

    if not use_fast_variance:
        (mean,) = across_devices(mean_of(x))
        # Equal shards: the mean of the shards' squared deviations.
        (var,) = across_devices(mean_of(_squared_magnitude(x - jnp.expand_dims(mean, axes))))
        return mean, var
    # E[x] and E[x^2] average exactly across equally sized shards, which
    # E[(x - mean)^2] would not: one collective for both moments.
    # The squares are taken before either mean and the clip reads max(0, .),
    # as flax does: the gradient's program is then flax's, operation for
    # operation, so a model trains to flax's numbers bit for bit.
    squares = _squared_magnitude(x)
    mean, mean_of_squares = across_devices(mean_of(x), mean_of(squares))
    # Biased ("population") variance: divide by N, not N - 1. Round-off can
    # make E[x^2] - E[x]^2 slightly negative, so clip at zero.
    var = jnp.maximum(0.0, mean_of_squares - _squared_magnitude(mean))
    return mean, var


def lp_statistics(x, axis_name: str | None = None, *, p: float, reduction_axes=None, mask=None,
                  axis_index_groups=None, dtype=None, force_float32_reductions: bool = True, use_fast_variance=True):
    """The statistics of Santurkar et al.'s l_p normalization (NeurIPS 2018,
    section 3.3) in `batch_statistics`'s form: (mean, s^2), where s is each
    feature's average l_p magnitude of the values before the mean is taken
    off, (E|x|^p)^(1/p), or max |x| for p = inf. Normalizing with them,
    (x - mean) / sqrt(s^2 + eps), centres each feature but fixes no variance
    (s^2 = var + mean^2 for p = 2): the moments stay free. `use_fast_variance`
    does not apply (no variance is computed)."""
    x, axes, where = _reduction_inputs(x, reduction_axes, mask, dtype, force_float32_reductions)
    magnitude = jnp.abs(x)
    mean = jnp.mean(x, axis=axes, where=where)
    if p == math.inf:
        largest = jnp.max(magnitude, axis=axes, where=where, initial=0.0)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name, axis_index_groups=axis_index_groups)
            largest = jax.lax.pmax(largest, axis_name, axis_index_groups=axis_index_groups)
        return mean, jnp.square(largest)
    moment = jnp.mean(magnitude ** p, axis=axes, where=where)
    if axis_name is not None:
        mean, moment = jax.lax.pmean((mean, moment), axis_name, axis_index_groups=axis_index_groups)
    return mean, moment ** (2.0 / p)


def ghost_batch_statistics(x, ghost_batch_size: int, **statistics):
    """Mean and biased variance of each ghost batch: `x` (B, ...) split along
    its first axis into B // ghost_batch_size groups of consecutive examples,
    each reduced as `batch_statistics(group, **statistics)` would reduce `x`.
    Returns two (groups, *features) arrays.

    Ghost batches (Hoffer et al., 2017) normalize each group by its own
    statistics inside one device: the normalization batch size is
    `ghost_batch_size` whatever the batch the optimizer steps with (Wu &
    Johnson 2021 study this normalization batch size from 2 to 1024)."""
    batch = x.shape[0]
    if not is_integer(ghost_batch_size) or ghost_batch_size < 1 or batch % ghost_batch_size:
        raise ValueError(f"ghost_batch_size must be a positive integer that divides the batch of {batch} examples, "
                         f"got {ghost_batch_size!r}")
    groups = x.reshape(batch // ghost_batch_size, ghost_batch_size, *x.shape[1:])
    statistics_of = statistics.pop("statistics_of", batch_statistics)
    return jax.vmap(lambda group: statistics_of(group, None, **statistics))(groups)


def normalize(x, mean, var, scale, bias, epsilon: float):
    """y = scale * (x - mean) / sqrt(var + epsilon) + bias, with mean, var,
    scale and bias broadcast against x (scale or bias None: left out), in
    flax.linen.BatchNorm's order of operations."""
    inverse_std = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inverse_std if scale is None else inverse_std * scale)
    return y if bias is None else y + bias


def check_running_average(running_average: str, name: str = "running_average") -> None:
    check_choice(name, running_average, RUNNING_AVERAGES)


def running_average_weights(running_average: str, momentum: float, count):
    """(keep, take): the t-th batch statistic (t = count >= 1) enters as
        new_running = keep * running + take * batch_statistic,
    with keep = 1 - take, under each rule:

      "ema"           take = 1 - momentum: the exponential moving average of
                      Keras, Flax and PyTorch. It starts from mean 0 / var 1,
                      which it forgets at rate momentum^t (at 0.99, ~460 steps
                      to 1%).
      "debiased_ema"  take = (1 - momentum) / (1 - momentum^t): Haiku's
                      zero-debiased average (hk.ExponentialMovingAverage,
                      zero_debias=True). The same weights on the batch
                      statistics, rescaled to sum to 1: take_1 = 1, so the
                      starting values never count.
      "cumulative"    take = 1 / t: the equal-weight mean of every batch
                      statistic so far, PyTorch's momentum=None.
    """
    check_running_average(running_average)
    if running_average == "ema":
        return momentum, 1.0 - momentum  # keep = momentum itself, not 1 - take: the exact weights of Keras and Flax
    t = jnp.asarray(count, jnp.float32)
    take = (1.0 - momentum) / (1.0 - momentum**t) if running_average == "debiased_ema" else 1.0 / t
    return 1.0 - take, take


@dataclasses.dataclass(frozen=True)
class RunningAverage:
    """How train mode updates BN's running statistics: the `rule` of
    `running_average_weights` with `momentum`, and whether the running
    variance tracks the batch's biased variance (Keras, Flax) or, with
    `unbiased_var`, the N / (N - 1)-corrected one (PyTorch)."""

    momentum: float = DEFAULT_MOMENTUM
    rule: str = "ema"
    unbiased_var: bool = False


def batch_norm_train(x, scale, bias, running: dict, average: RunningAverage = RunningAverage(),
                     epsilon: float = DEFAULT_EPSILON, ghost_batch_size: int | None = None, **statistics):
    """Train mode: normalize with this batch's statistics, update the running ones.

    `running`: the layer's running "mean" and "var" and, where kept, "count"
    (updates so far). Returns (y, new_running) with new_running's "mean",
    "var" and "count", where
        new_running = keep * running + take * batch_statistic
    with (keep, take) from `running_average_weights` for this update under
    `average` (for the default "ema": keep = momentum, take = 1 - momentum).
    The batch is always normalized with its biased variance.
    Gradients flow through the batch mean and variance (that is what makes BN
    more than a fixed rescaling); the running averages are not differentiated.

    `statistics`: how `batch_statistics` computes them (axis_name,
    reduction_axes, use_fast_variance, mask, axis_index_groups, dtype,
    force_float32_reductions); the running statistics have the shape of the
    axes not reduced, and scale and bias broadcast against x.

    `ghost_batch_size`: each group of that many consecutive examples (along
    axis 0) is normalized with its own statistics (`ghost_batch_statistics`),
    and the running averages take the mean over the groups (and over devices,
    with `axis_name`) of the group means and group variances: what ghost BN
    over devices records (the train step averages each device's update).
    """
    count = running.get("count", 0) + 1
    keep, take = running_average_weights(average.rule, average.momentum, count)
    axes = reduction_axes_of(x.ndim, statistics.get("reduction_axes"))
    statistics = {**statistics, "reduction_axes": axes}
    axis_name = statistics.pop("axis_name", None)
    if ghost_batch_size is None:
        mean, var = statistics.pop("statistics_of", batch_statistics)(x, axis_name, **statistics)
        y = normalize(x, broadcast_features(mean, axes), broadcast_features(var, axes), scale, bias,
                      epsilon)
    else:
        group_mean, group_var = ghost_batch_statistics(x, ghost_batch_size, **statistics)
        groups = x.reshape(group_mean.shape[0], ghost_batch_size, *x.shape[1:])
        group_axes = tuple(axis + 1 for axis in axes)  # the groups' reduction axes, behind the axis of groups
        y = normalize(groups, jnp.expand_dims(group_mean, group_axes), jnp.expand_dims(group_var, group_axes),
                      scale, bias, epsilon).reshape(x.shape)
        mean, var = group_mean.mean(axis=0), group_var.mean(axis=0)
        if axis_name is not None:
            mean, var = jax.lax.pmean((mean, var), axis_name,
                                      axis_index_groups=statistics.get("axis_index_groups"))
    var_for_running = var
    if average.unbiased_var:
        values = math.prod(x.shape[axis] for axis in axes)  # values per feature in this (local) batch
        if ghost_batch_size is not None:
            values = values * ghost_batch_size // x.shape[0]  # ... in one ghost batch
        if axis_name is not None and ghost_batch_size is None:
            values = values * jax.lax.psum(1, axis_name, axis_index_groups=statistics.get("axis_index_groups"))
        var_for_running = var * (values / max(values - 1, 1))
    new_running = {"mean": keep * running["mean"] + take * jax.lax.stop_gradient(mean),
                   "var": keep * running["var"] + take * jax.lax.stop_gradient(var_for_running),
                   "count": count}
    return y, new_running


def batch_norm_eval(x, scale, bias, running_mean, running_var, epsilon: float = DEFAULT_EPSILON):
    """Eval mode: normalize with the running averages. Nothing is updated, and
    each example's output depends on that example alone."""
    return normalize(x, running_mean, running_var, scale, bias, epsilon)


def check_variant(running_average: str, renorm: bool, frozen: bool, ghost_batch_size,
                  unbiased_running_var: bool = False) -> None:
    """The rules of which BN variants go together: one-line ValueErrors."""
    check_running_average(running_average, "running_average")
    if renorm and running_average != "ema":
        raise ValueError(f"renorm keeps Keras's moving averages; use running_average 'ema' with it, not "
                         f"{running_average!r}")
    if renorm and unbiased_running_var:
        raise ValueError("renorm keeps Keras's moving averages of the biased variance; "
                         "unbiased_running_var does not apply")
    if renorm and frozen:
        raise ValueError("frozen uses the running statistics, also in training: renorm does not apply")
    if ghost_batch_size is None:
        return
    if not is_integer(ghost_batch_size) or ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be None or a positive integer, got {ghost_batch_size!r}")
    if renorm or frozen:
        raise ValueError(f"ghost_batch_size applies to plain BN only, not with {'renorm' if renorm else 'frozen'}")


# ---------------------------------------------------------------- Batch Renormalization
# Batch Renormalization (Ioffe, 2017). BN trains with batch statistics and tests with running averages, so the
# net it tests is not quite the net it trained. Batch Renorm trains the test
# net's normalization while keeping batch statistics' gradients:
#
#     sigma_B = sqrt(var_B + eps)                      this batch's std
#     r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
#     d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
#     y = scale * ((x - mu_B) / sigma_B * r + d) + bias
#
# where mu, sigma are moving averages (momentum `Renorm.momentum`). Unclipped,
# (x - mu_B) / sigma_B * r + d = (x - mu) / sigma: the running statistics'
# normalization, exactly; with r_max = 1, d_max = 0 it is plain BN. The paper
# ramps r_max from 1 and d_max from 0 (`warmup_steps` here: both linearly over
# the first steps, `clip_limits`).
#
# As Keras's `BatchNormalization(renorm=True)` (Keras 3.15), which this
# matches on numbers exported from it (tests/test_batch_renorm.py), two sets
# of moving averages are kept, in `batch_stats`:
#   * `renorm_mean`, `renorm_std`: mu and sigma of r and d, with `Renorm.momentum`;
#   * `mean`, `std`: the inference statistics, with BN's own momentum; eval
#     mode reads `mean` and `var` = max(std^2 - eps, 0) as for any BN (so the
#     moving average is of sigma, as the paper's, not of the variance);
#   * `count`: updates so far, for the warm-up.

@dataclasses.dataclass(frozen=True)
class Renorm:
    """Batch Renorm's settings (the paper's final r_max 3 and d_max 5)."""

    r_max: float = 3.0
    d_max: float = 5.0
    momentum: float = 0.99  # of renorm_mean / renorm_std (Keras's renorm_momentum)
    warmup_steps: int = 0  # r_max from 1 and d_max from 0 to their values over these many updates

    def __post_init__(self):
        check_renorm_settings(self.r_max, self.d_max, self.momentum, self.warmup_steps)


def check_renorm_settings(r_max, d_max, momentum, warmup_steps) -> None:
    """One-line ValueErrors naming the bad value."""
    def real(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    if not real(r_max) or r_max < 1:
        raise ValueError(f"r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not real(d_max) or d_max < 0:
        raise ValueError(f"d_max must be a number >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")
    if not real(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    check_integer("warmup_steps", warmup_steps, minimum=0)


def clip_limits(renorm: Renorm, count):
    """(r_max, d_max) for the `count`-th update (count >= 1): after the warm-up
    the set values; during it, 1 + (r_max - 1) * f and d_max * f with
    f = (count - 1) / warmup_steps, so the first update is plain BN."""
    if renorm.warmup_steps == 0:
        return renorm.r_max, renorm.d_max
    fraction = jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) - 1.0) / renorm.warmup_steps)
    return 1.0 + (renorm.r_max - 1.0) * fraction, renorm.d_max * fraction


def batch_renorm_train(x, scale, bias, stats: dict, renorm: Renorm, momentum: float, epsilon: float,
                       **statistics):
    """Train mode of Batch Renorm. `stats`: this layer's `batch_stats` (mean,
    var, std, renorm_mean, renorm_std, count); `statistics`: how
    `batch_statistics` computes the batch's (axis_name included). Returns (y, new_stats)."""
    axes = reduction_axes_of(x.ndim, statistics.get("reduction_axes"))
    statistics = {**statistics, "reduction_axes": axes}
    mean, var = batch_statistics(x, statistics.pop("axis_name", None), **statistics)
    std = jnp.sqrt(var + epsilon)
    count = stats["count"] + 1
    r_max, d_max = clip_limits(renorm, count)
    # renorm_std is an average of values >= sqrt(eps) that starts at 1, so it
    # never reaches 0 (Keras guards it with max(renorm_std, sqrt(eps)): a no-op).
    r = jax.lax.stop_gradient(jnp.clip(std / stats["renorm_std"], 1.0 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - stats["renorm_mean"]) / stats["renorm_std"], -d_max, d_max))
    scale = 1.0 if scale is None else scale
    bias = 0.0 if bias is None else bias
    shaped = {name: broadcast_features(value, axes) for name, value in (("mean", mean), ("var", var),
                                                                               ("r", r), ("d", d))}
    y = normalize(x, shaped["mean"], shaped["var"], scale * shaped["r"], scale * shaped["d"] + bias, epsilon)

    mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)
    new_std = momentum * stats["std"] + (1.0 - momentum) * std
    new_stats = {
        "renorm_mean": renorm.momentum * stats["renorm_mean"] + (1.0 - renorm.momentum) * mean,
        "renorm_std": renorm.momentum * stats["renorm_std"] + (1.0 - renorm.momentum) * std,
        "mean": momentum * stats["mean"] + (1.0 - momentum) * mean,
        "std": new_std,
        "var": jnp.maximum(jnp.square(new_std) - epsilon, 0.0),
        "count": count,
    }
    return y, new_stats


class BatchNorm(nn.Module):
    """Batch Normalization as a linen module, a drop-in for flax.linen.BatchNorm.

        y = scale * (x - mean) / sqrt(var + epsilon) + bias

    over the axes not in `axis`. In train mode (`use_running_average=False`)
    mean and var are this batch's, and the running averages in `batch_stats`
    move (inside `apply(..., mutable=["batch_stats"])`):
        running = momentum * running + (1 - momentum) * batch_statistic.
    In eval mode (`use_running_average=True`) mean and var are the running
    averages and nothing changes.

    flax's fields, in flax's order and with its defaults (flax 0.12):
      use_running_average  None: given at the call; True: eval mode, False: train mode.
      axis                 the feature axis or axes (-1: NHWC; 1: NCHW); the others are reduced.
      momentum             0.99, of the running averages; in [0, 1].
      epsilon              1e-5, added to the variance; > 0. (Keras: 1e-3, `keras_bn`.)
      dtype                None: the output's dtype from the input's and the parameters'.
      param_dtype          float32, of scale and bias.
      use_bias, use_scale  True: learn bias / scale.
      bias_init, scale_init  zeros / ones.
      axis_name            the named device axis the batch statistics are averaged over (synchronized BN).
      axis_index_groups    groups of devices along axis_name, each averaged on its own.
      use_fast_variance    True: var = E[x^2] - E[x]^2 in one pass; False: E[(x - E[x])^2].
      force_float32_reductions  True: statistics in at least float32 whatever the input.
    Variables, as flax's: params `scale`, `bias`; batch_stats `mean`, `var`.
    The call is flax's: `bn(x, use_running_average=None, *, mask=None)`,
    `mask` a boolean array broadcastable to x: the values the statistics count.

    bnjax's variants, keyword-only, each off by default (so BatchNorm() is flax's):
      running_average      "ema" (flax, Keras, PyTorch), "debiased_ema" (Haiku), "cumulative"
                           (PyTorch's momentum=None): `running_average_weights`. The last two
                           also keep `count`, the updates so far, in batch_stats.
      unbiased_running_var True: the running variance tracks N / (N - 1) x the batch's (PyTorch).
      renorm               Renorm(...): Batch Renormalization in train mode (`batch_renorm_train`).
      frozen               True: frozen BN for fine-tuning (torchvision's FrozenBatchNorm2d):
                           train mode too normalizes with the running statistics, updates
                           nothing, and scale and bias get no gradient.
      ghost_batch_size     train mode: each group of this many consecutive examples (axis 0)
                           is normalized with its own statistics (Hoffer et al., 2017).

    An unbound BatchNorm is also how BN's settings travel as one value: the
    nets take one as `bn` and copy it for each of their BN layers, as
    flax/examples/imagenet hands its ResNet `partial(nn.BatchNorm, ...)`.
    Every setting is checked when the BatchNorm is made: one-line ValueErrors.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = DEFAULT_MOMENTUM
    epsilon: float = DEFAULT_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    _: dataclasses.KW_ONLY
    running_average: str = "ema"
    unbiased_running_var: bool = False
    renorm: Renorm | None = None
    frozen: bool = False
    ghost_batch_size: int | None = None

    def __post_init__(self):
        check_settings(self)
        super().__post_init__()

    def for_output(self) -> BatchNorm:
        """The layer a net's output BN (the logits') copies: this one (a
        variant may keep something from the output: NoisyBatchNorm's noise)."""
        return self

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        check_call(self, x, use_running_average, mask)
        feature_axes = canonical_axes(x.ndim, self.axis)
        reduction_axes = tuple(axis for axis in range(x.ndim) if axis not in feature_axes)
        feature_shape = tuple(x.shape[axis] for axis in feature_axes)

        statistics_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        running = {"mean": self.variable("batch_stats", "mean", lambda: jnp.zeros(feature_shape, statistics_dtype)),
                   "var": self.variable("batch_stats", "var", lambda: jnp.ones(feature_shape, statistics_dtype))}
        if self.running_average != "ema" or self.renorm is not None:  # updates so far
            running["count"] = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        if self.renorm is not None:
            for name, init in (("std", jnp.ones), ("renorm_mean", jnp.zeros), ("renorm_std", jnp.ones)):
                running[name] = self.variable("batch_stats", name, lambda init=init: init(feature_shape,
                                                                                         statistics_dtype))
        # As flax: scale, then bias (the order their initializers draw keys in).
        scale = (broadcast_features(self.param("scale", self.scale_init, feature_shape, self.param_dtype),
                                    reduction_axes) if self.use_scale else None)
        bias = (broadcast_features(self.param("bias", self.bias_init, feature_shape, self.param_dtype),
                                   reduction_axes) if self.use_bias else None)
        output_dtype = canonicalize_dtype(*(value for value in (x, scale, bias) if value is not None),
                                          dtype=self.dtype)
        # `init` runs outside any device mapping, so there is no axis to average over.
        axis_name = None if self.is_initializing() else self.axis_name
        y, new_running = forward(self, x, scale, bias, {name: variable.value for name, variable in running.items()},
                                 use_running_average, mask, axis_name)
        # Where running statistics change (train mode only). `init` only
        # creates them (as flax.linen.BatchNorm does), so a freshly initialized
        # model starts from mean 0, var 1 whatever batch initialized it.
        if new_running is not None and not self.is_initializing():
            for name, variable in running.items():
                variable.value = new_running[name]
        return jnp.asarray(y, output_dtype)


def forward(bn, x, scale, bias, running: dict, use_running_average: bool, mask, axis_name):
    """One call of a BN layer `bn` (bnjax's linen or NNX BatchNorm: the
    settings are its attributes) on x, given its scale and bias (broadcast
    against x, or None) and the values of its running statistics. Returns
    (y, new running statistics), or (y, None) where nothing is updated."""
    reduction_axes = tuple(axis for axis in range(x.ndim) if axis not in canonical_axes(x.ndim, bn.axis))
    force_float32_reductions = getattr(bn, "force_float32_reductions", True)  # flax.nnx has no such setting
    if bn.frozen:
        scale, bias = (None if value is None else jax.lax.stop_gradient(value) for value in (scale, bias))
    if use_running_average or bn.frozen:
        mean, var = running["mean"], running["var"]
        if not force_float32_reductions:
            mean, var = jnp.asarray(mean, bn.param_dtype), jnp.asarray(var, bn.param_dtype)
        return batch_norm_eval(x, scale, bias, broadcast_features(mean, reduction_axes),
                               broadcast_features(var, reduction_axes), bn.epsilon), None

    statistics = dict(axis_name=axis_name, reduction_axes=reduction_axes, use_fast_variance=bn.use_fast_variance,
                      mask=mask, axis_index_groups=bn.axis_index_groups, dtype=bn.dtype,
                      force_float32_reductions=force_float32_reductions)
    if bn.renorm is not None:
        return batch_renorm_train(x, scale, bias, running, bn.renorm, bn.momentum, bn.epsilon, **statistics)
    if getattr(bn, "p", None) is not None:  # l_p normalization (bnjax.bn.lp_norm.LpBatchNorm)
        statistics["statistics_of"] = functools.partial(lp_statistics, p=bn.p)
    average = RunningAverage(bn.momentum, bn.running_average, bn.unbiased_running_var)
    return batch_norm_train(x, scale, bias, running, average, bn.epsilon, bn.ghost_batch_size, **statistics)


def check_settings(bn: BatchNorm) -> None:
    """Every setting of a BatchNorm, where it is made: one-line ValueErrors
    naming the bad value and what is allowed."""
    if bn.use_running_average is not None and not isinstance(bn.use_running_average, bool):
        raise ValueError(f"use_running_average must be None, True or False, got {bn.use_running_average!r}")
    axes = (bn.axis,) if isinstance(bn.axis, int) else bn.axis
    if isinstance(bn.axis, bool) or not isinstance(axes, (tuple, list)) or not axes or not all(
            is_integer(axis) for axis in axes):
        raise ValueError(f"axis must be an integer or a non-empty tuple of integers, got {bn.axis!r}")
    if not is_real(bn.momentum) or not 0 <= bn.momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1] (the weight of the old running value), "
                         f"got {bn.momentum!r}")
    if not is_real(bn.epsilon) or not bn.epsilon > 0:
        raise ValueError(f"epsilon must be a number > 0, got {bn.epsilon!r}")
    for name in ("dtype", "param_dtype"):
        value = getattr(bn, name)
        if value is None and name == "dtype":
            continue
        try:
            inexact = jnp.issubdtype(jnp.dtype(value), jnp.inexact)
        except TypeError:
            inexact = False
        if not inexact:
            allowed = "None or a floating-point dtype" if name == "dtype" else "a floating-point dtype"
            raise ValueError(f"{name} must be {allowed} (float32, bfloat16, ...), got {value!r}")
    for name in ("use_bias", "use_scale", "use_fast_variance", "force_float32_reductions", "unbiased_running_var",
                 "frozen"):
        check_bool(name, getattr(bn, name))
    for name in ("bias_init", "scale_init"):
        if not callable(getattr(bn, name)):
            raise ValueError(f"{name} must be an initializer (key, shape, dtype) -> array, got {getattr(bn, name)!r}")
    if bn.renorm is not None and not isinstance(bn.renorm, Renorm):
        raise ValueError(f"renorm must be None or a bnjax.Renorm(...) (Keras's renorm=True is renorm=bnjax.Renorm()), "
                         f"got {bn.renorm!r}")
    check_variant(bn.running_average, bn.renorm is not None, bn.frozen, bn.ghost_batch_size, bn.unbiased_running_var)


def check_call(bn: BatchNorm, x, use_running_average, mask) -> None:
    """What only the call can check: the input against the settings."""
    if not isinstance(use_running_average, bool):  # flax's merge_param has refused None already
        raise ValueError(f"use_running_average must be True or False, got {use_running_average!r}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(f"BatchNorm normalizes floating-point or complex inputs, got dtype {jnp.result_type(x)}")
    feature_axes = (bn.axis,) if isinstance(bn.axis, int) else tuple(bn.axis)
    if any(not -x.ndim <= axis < x.ndim for axis in feature_axes):
        raise ValueError(f"axis {bn.axis!r} is out of range for an input of {x.ndim} dimensions {tuple(x.shape)}")
    if use_running_average or bn.frozen:
        return
    if bn.ghost_batch_size is not None and 0 in canonical_axes(x.ndim, feature_axes):
        raise ValueError(f"ghost_batch_size groups the examples along axis 0, which axis={bn.axis!r} makes a "
                         f"feature axis")
    if mask is not None and (bn.ghost_batch_size is not None or bn.unbiased_running_var):
        name = "ghost_batch_size" if bn.ghost_batch_size is not None else "unbiased_running_var"
        raise ValueError(f"mask is not supported with {name}: they count the values per feature")


def keras_bn(layer: type | None = None, **changes: Any) -> BatchNorm:
    """Keras's BN settings, the article's, which bnjax's own nets use
    (momentum 0.99, epsilon 1e-3), as an unbound `layer` (BatchNorm, or a
    subclass such as NoisyBatchNorm) with `changes` to any setting:
    `keras_bn(momentum=0.9)`.

    Made when called, never at import, and with no parent even when called
    inside a compact method: a Flax module made at import would become a
    child, and take a name, in the scope of whichever model's method
    happened to import bnjax first.

    Args:
      layer: the BN class (default BatchNorm).
      **changes: settings that differ from Keras's.
    Returns:
      The unbound layer, to hand a net as its `bn` or to copy."""
    settings = {"momentum": KERAS_MOMENTUM, "epsilon": KERAS_EPSILON, **changes}
    return (layer or BatchNorm)(**settings, parent=None)
