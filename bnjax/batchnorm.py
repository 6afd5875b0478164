"""Batch Normalization written out from the equations (Ioffe & Szegedy, 2015).

Two pure functions hold all of the math:

    batch_norm_train(x, scale, bias, running_mean, running_var, ...)
        -> (y, new_running_mean, new_running_var)
    batch_norm_eval(x, scale, bias, running_mean, running_var, ...) -> y

and a small Flax linen module, `BatchNorm`, stores their state: `scale` and
`bias` in the `params` collection (learned by the optimizer), `mean` and `var`
in the `batch_stats` collection (running averages, updated only in train mode).
The names and shapes are those of `flax.linen.BatchNorm`, so variables move
between the two unchanged.

The variants live beside them, so that one file shows every way BN's state
moves: the running-average rules
(`running_average_weights`), Batch Renormalization (`batch_renorm_train`),
frozen BN (`BatchNorm(frozen=True)`) and ghost batches inside a device
(`ghost_batch_statistics`).

The feature axis is the last one (NHWC images, (batch, features) vectors), as in
Keras (`axis=-1`) and Flax.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from bnjax.checks import check_choice, check_integer, is_integer

# Keras's defaults, which the article used. PyTorch's momentum=0.1 weights the
# *new* batch statistic; Keras and Flax weight the *old* running value, so
# PyTorch 0.1 is Keras/Flax 0.9.
DEFAULT_MOMENTUM = 0.99
DEFAULT_EPSILON = 1e-3
# How the running statistics average the batch statistics (running_average_weights).
RUNNING_AVERAGES = ("ema", "debiased_ema", "cumulative")


def batch_statistics(x, axis_name: str | None = None, two_pass_variance: bool = False):
    """Mean and biased variance of `x` over every axis but the last.

    x: (..., features). Returns two (features,) float32 arrays. With `axis_name`
    (inside `shard_map`/`pmap`), the statistics are those of the global batch
    across devices, assuming every device holds the same number of examples.

    One pass (the default, as Flax and Keras): var = E[x^2] - E[x]^2, both
    moments in one sweep and one collective; in float32 it loses the variance
    when the mean is large against the spread (mean 1e4, std 1: E[x^2] ~ 1e8,
    whose float32 spacing is 8). `two_pass_variance`: var = E[(x - E[x])^2],
    a second sweep (and a second collective) after the mean, accurate there.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    reduction_axes = tuple(range(x.ndim - 1))
    if two_pass_variance:
        mean = jnp.mean(x, axis=reduction_axes)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(x - mean), axis=reduction_axes)
        if axis_name is not None:
            var = jax.lax.pmean(var, axis_name)  # equal shards: the mean of the shards' squared deviations
        return mean, var
    mean = jnp.mean(x, axis=reduction_axes)
    mean_of_squares = jnp.mean(jnp.square(x), axis=reduction_axes)
    if axis_name is not None:
        # One collective for both moments: E[x] and E[x^2] average exactly
        # across equally sized shards, which E[(x - mean)^2] would not.
        mean, mean_of_squares = jax.lax.pmean((mean, mean_of_squares), axis_name)
    # Biased ("population") variance: divide by N, not N - 1. Round-off can
    # make E[x^2] - E[x]^2 slightly negative, so clip at zero.
    var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
    return mean, var


def ghost_batch_statistics(x, ghost_batch_size: int, two_pass_variance: bool = False):
    """Mean and biased variance of each ghost batch: `x` (B, ..., features)
    split along its first axis into B // ghost_batch_size groups of
    consecutive examples. Returns two (groups, features) arrays.

    Ghost batches (Hoffer et al., 2017) normalize each group by its own
    statistics inside one device: the normalization batch size is
    `ghost_batch_size` whatever the batch the optimizer steps with (Wu &
    Johnson 2021 study this normalization batch size from 2 to 1024)."""
    batch = x.shape[0]
    if not is_integer(ghost_batch_size) or ghost_batch_size < 1 or batch % ghost_batch_size:
        raise ValueError(f"ghost_batch_size must be a positive integer that divides the batch of {batch} examples, "
                         f"got {ghost_batch_size!r}")
    groups = x.reshape(batch // ghost_batch_size, ghost_batch_size, *x.shape[1:])
    return jax.vmap(lambda group: batch_statistics(group, None, two_pass_variance))(groups)


def normalize(x, mean, var, scale, bias, epsilon: float):
    """y = scale * (x - mean) / sqrt(var + epsilon) + bias, per feature."""
    inverse_std = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * (inverse_std * scale) + bias


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
        return momentum, 1.0 - momentum  # the expression used before the other rules existed: same numbers
    t = jnp.asarray(count, jnp.float32)
    take = (1.0 - momentum) / (1.0 - momentum**t) if running_average == "debiased_ema" else 1.0 / t
    return 1.0 - take, take


def batch_norm_train(
    x,
    scale,
    bias,
    running_mean,
    running_var,
    momentum: float = DEFAULT_MOMENTUM,
    epsilon: float = DEFAULT_EPSILON,
    axis_name: str | None = None,
    unbiased_running_var: bool = False,
    running_average: str = "ema",
    count=1,
    two_pass_variance: bool = False,
    ghost_batch_size: int | None = None,
):
    """Train mode: normalize with this batch's statistics, update the running ones.

    Returns (y, new_running_mean, new_running_var), where
        new_running = keep * running + take * batch_statistic
    with (keep, take) from `running_average_weights` for this, the `count`-th,
    update: for the default "ema", keep = momentum, take = 1 - momentum.
    The batch is always normalized with its biased variance; the running
    variance tracks the biased one too (Keras, Flax), or with
    `unbiased_running_var` the N / (N - 1)-corrected one (PyTorch).
    Gradients flow through the batch mean and variance (that is what makes BN
    more than a fixed rescaling); the running averages are not differentiated.

    `ghost_batch_size`: each group of that many consecutive examples is
    normalized with its own statistics (`ghost_batch_statistics`), and the
    running averages take the mean over the groups (and over devices, with
    `axis_name`) of the group means and group variances: what ghost BN over
    devices records (bnjax/steps.py averages each device's update).
    """
    keep, take = running_average_weights(running_average, momentum, count)
    if ghost_batch_size is None:
        mean, var = batch_statistics(x, axis_name, two_pass_variance)
        y = normalize(x, mean, var, scale, bias, epsilon)
    else:
        group_mean, group_var = ghost_batch_statistics(x, ghost_batch_size, two_pass_variance)
        groups = x.reshape(group_mean.shape[0], ghost_batch_size, *x.shape[1:])
        per_group = (group_mean.shape[0],) + (1,) * (x.ndim - 1) + (x.shape[-1],)
        y = normalize(groups, group_mean.reshape(per_group), group_var.reshape(per_group), scale, bias,
                      epsilon).reshape(x.shape)
        mean, var = group_mean.mean(axis=0), group_var.mean(axis=0)
        if axis_name is not None:
            mean, var = jax.lax.pmean((mean, var), axis_name)
    var_for_running = var
    if unbiased_running_var:
        values = x.size // x.shape[-1]  # values per feature in this (local) batch
        if ghost_batch_size is not None:
            values = values * ghost_batch_size // x.shape[0]  # ... in one ghost batch
        if axis_name is not None and ghost_batch_size is None:
            values = values * jax.lax.psum(1, axis_name)
        var_for_running = var * (values / max(values - 1, 1))
    new_running_mean = keep * running_mean + take * jax.lax.stop_gradient(mean)
    new_running_var = keep * running_var + take * jax.lax.stop_gradient(var_for_running)
    return y, new_running_mean, new_running_var


def batch_norm_eval(x, scale, bias, running_mean, running_var, epsilon: float = DEFAULT_EPSILON):
    """Eval mode: normalize with the running averages. Nothing is updated, and
    each example's output depends on that example alone."""
    return normalize(x, running_mean, running_var, scale, bias, epsilon)


def check_variant(running_average: str, renorm: bool, frozen: bool, ghost_batch_size, unbiased_running_var: bool = False,
                  prefix: str = "") -> None:
    """The rules of which BN variants go together, for `BatchNorm` (prefix "")
    and `TrainConfig` (prefix "bn_", its field names): one-line ValueErrors."""
    check_running_average(running_average, f"{prefix}running_average")
    if renorm and running_average != "ema":
        raise ValueError(f"{prefix}renorm keeps Keras's moving averages; use {prefix}running_average 'ema' with it, "
                         f"not {running_average!r}")
    if renorm and unbiased_running_var:
        raise ValueError(f"{prefix}renorm keeps Keras's moving averages of the biased variance; "
                         f"unbiased_running_var does not apply")
    if renorm and frozen:
        raise ValueError(f"{prefix}frozen uses the running statistics, also in training: {prefix}renorm does not apply")
    if ghost_batch_size is None:
        return
    if not is_integer(ghost_batch_size) or ghost_batch_size < 1:
        raise ValueError(f"{prefix}ghost_batch_size must be None or a positive integer, got {ghost_batch_size!r}")
    if renorm or frozen:
        raise ValueError(f"{prefix}ghost_batch_size applies to plain BN only, not with "
                         f"{prefix}{'renorm' if renorm else 'frozen'}")


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
        check_renorm_settings(self.r_max, self.d_max, self.momentum, self.warmup_steps, prefix="")


def check_renorm_settings(r_max, d_max, momentum, warmup_steps, prefix: str = "") -> None:
    """One-line ValueErrors naming the bad value (fields named `prefix` + name)."""
    def real(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    if not real(r_max) or r_max < 1:
        raise ValueError(f"{prefix}r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not real(d_max) or d_max < 0:
        raise ValueError(f"{prefix}d_max must be a number >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")
    if not real(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"{prefix}momentum must be a number in [0, 1), got {momentum!r}")
    check_integer(f"{prefix}warmup_steps", warmup_steps, minimum=0)


def clip_limits(renorm: Renorm, count):
    """(r_max, d_max) for the `count`-th update (count >= 1): after the warm-up
    the set values; during it, 1 + (r_max - 1) * f and d_max * f with
    f = (count - 1) / warmup_steps, so the first update is plain BN."""
    if renorm.warmup_steps == 0:
        return renorm.r_max, renorm.d_max
    fraction = jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) - 1.0) / renorm.warmup_steps)
    return 1.0 + (renorm.r_max - 1.0) * fraction, renorm.d_max * fraction


def batch_renorm_train(x, scale, bias, stats: dict, renorm: Renorm, momentum: float, epsilon: float,
                       axis_name: str | None = None, two_pass_variance: bool = False):
    """Train mode of Batch Renorm. `stats`: this layer's `batch_stats` (mean,
    var, std, renorm_mean, renorm_std, count). Returns (y, new_stats)."""
    mean, var = batch_statistics(x, axis_name, two_pass_variance)
    std = jnp.sqrt(var + epsilon)
    count = stats["count"] + 1
    r_max, d_max = clip_limits(renorm, count)
    # renorm_std is an average of values >= sqrt(eps) that starts at 1, so it
    # never reaches 0 (Keras guards it with max(renorm_std, sqrt(eps)): a no-op).
    r = jax.lax.stop_gradient(jnp.clip(std / stats["renorm_std"], 1.0 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - stats["renorm_mean"]) / stats["renorm_std"], -d_max, d_max))
    y = normalize(x, mean, var, scale * r, scale * d + bias, epsilon)

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
    """Linen wrapper that keeps BN's state in Flax collections.

    Call as `BatchNorm()(x, train=True)` inside `apply(..., mutable=["batch_stats"])`,
    or `BatchNorm()(x, train=False)` with nothing mutable.

    An unbound BatchNorm is also how BN's settings travel as one value: the
    nets take one as `bn` and copy it for each of their BN layers
    (`ConvNet(batch_norm=True, bn=BatchNorm(momentum=0.9, epsilon=1e-5))`, as
    flax/examples/imagenet hands its ResNet `partial(nn.BatchNorm, ...)`).
    The settings are checked when the BatchNorm is made (`check_variant`).

    `running_average` picks the rule of `running_average_weights`. The rules
    that weigh the t-th update by t ("debiased_ema", "cumulative") also keep
    `count`, the number of updates so far, in `batch_stats`; "ema" keeps only
    `mean` and `var`, as flax.linen.BatchNorm. Eval mode normalizes with the
    rule's current `mean` and `var` whatever the rule.

    `renorm=Renorm(...)`: Batch Renormalization in train mode
    (`batch_renorm_train`; eval mode unchanged). `frozen=True`: frozen BN for
    fine-tuning (torchvision's FrozenBatchNorm2d): train mode too normalizes
    with the running statistics and updates nothing, and `scale` and `bias`
    get no gradient (their gradient is stopped, so the optimizer sees zeros).
    """

    momentum: float = DEFAULT_MOMENTUM
    epsilon: float = DEFAULT_EPSILON
    axis_name: str | None = None
    unbiased_running_var: bool = False  # True: PyTorch's running-variance convention
    running_average: str = "ema"
    two_pass_variance: bool = False  # batch_statistics: E[(x - E[x])^2] instead of E[x^2] - E[x]^2
    renorm: Renorm | None = None
    frozen: bool = False
    ghost_batch_size: int | None = None  # train mode: groups of this many examples, each by its own statistics

    def __post_init__(self):
        # Checked where the settings are made, so a net holding a BatchNorm
        # as its `bn` (bnjax/models.py) holds a valid one.
        check_variant(self.running_average, self.renorm is not None, self.frozen, self.ghost_batch_size,
                      self.unbiased_running_var)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running = {"mean": self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32),
                   "var": self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)}
        if self.running_average != "ema" or self.renorm is not None:  # updates so far
            running["count"] = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        if self.renorm is not None:
            for name, init in (("std", jnp.ones), ("renorm_mean", jnp.zeros), ("renorm_std", jnp.ones)):
                running[name] = self.variable("batch_stats", name, init, (features,), jnp.float32)

        if self.frozen:
            scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
        if not train or self.frozen:
            return batch_norm_eval(x, scale, bias, running["mean"].value, running["var"].value, self.epsilon)

        # `init` runs outside any device mapping, so there is no axis to average over.
        axis_name = None if self.is_initializing() else self.axis_name
        if self.renorm is not None:
            y, new_running = batch_renorm_train(
                x, scale, bias, {name: variable.value for name, variable in running.items()}, self.renorm,
                self.momentum, self.epsilon, axis_name, self.two_pass_variance)
        else:
            count = 1 if "count" not in running else running["count"].value + 1
            y, new_mean, new_var = batch_norm_train(
                x, scale, bias, running["mean"].value, running["var"].value, self.momentum, self.epsilon,
                axis_name=axis_name, unbiased_running_var=self.unbiased_running_var,
                running_average=self.running_average, count=count, two_pass_variance=self.two_pass_variance,
                ghost_batch_size=self.ghost_batch_size)
            new_running = {"mean": new_mean, "var": new_var, "count": count}
        # Where running statistics change (train mode only). `init` only
        # creates them (as flax.linen.BatchNorm does), so a freshly initialized
        # model starts from mean 0, var 1 whatever batch initialized it.
        if not self.is_initializing():
            for name, variable in running.items():
                variable.value = new_running[name]
        return y
