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

The feature axis is the last one (NHWC images, (batch, features) vectors), as in
Keras (`axis=-1`) and Flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

# Keras's defaults, which the article used. PyTorch's momentum=0.1 weights the
# *new* batch statistic; Keras and Flax weight the *old* running value, so
# PyTorch 0.1 is Keras/Flax 0.9.
DEFAULT_MOMENTUM = 0.99
DEFAULT_EPSILON = 1e-3


def batch_statistics(x, axis_name: str | None = None):
    """Mean and biased variance of `x` over every axis but the last.

    x: (..., features). Returns two (features,) float32 arrays. With `axis_name`
    (inside `shard_map`/`pmap`), the statistics are those of the global batch
    across devices, assuming every device holds the same number of examples.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    reduction_axes = tuple(range(x.ndim - 1))
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


def normalize(x, mean, var, scale, bias, epsilon: float):
    """y = scale * (x - mean) / sqrt(var + epsilon) + bias, per feature."""
    inverse_std = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * (inverse_std * scale) + bias


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
):
    """Train mode: normalize with this batch's statistics, update the running ones.

    Returns (y, new_running_mean, new_running_var), where
        new_running = momentum * running + (1 - momentum) * batch_statistic.
    The batch is always normalized with its biased variance; the running
    variance tracks the biased one too (Keras, Flax), or with
    `unbiased_running_var` the N / (N - 1)-corrected one (PyTorch).
    Gradients flow through the batch mean and variance (that is what makes BN
    more than a fixed rescaling); the running averages are not differentiated.
    """
    mean, var = batch_statistics(x, axis_name)
    y = normalize(x, mean, var, scale, bias, epsilon)
    var_for_running = var
    if unbiased_running_var:
        count = x.size // x.shape[-1]  # values per feature in this (local) batch
        if axis_name is not None:
            count = count * jax.lax.psum(1, axis_name)
        var_for_running = var * (count / max(count - 1, 1))
    new_running_mean = momentum * running_mean + (1.0 - momentum) * jax.lax.stop_gradient(mean)
    new_running_var = momentum * running_var + (1.0 - momentum) * jax.lax.stop_gradient(var_for_running)
    return y, new_running_mean, new_running_var


def batch_norm_eval(x, scale, bias, running_mean, running_var, epsilon: float = DEFAULT_EPSILON):
    """Eval mode: normalize with the running averages. Nothing is updated, and
    each example's output depends on that example alone."""
    return normalize(x, running_mean, running_var, scale, bias, epsilon)


class BatchNorm(nn.Module):
    """Linen wrapper that keeps BN's state in Flax collections.

    Call as `BatchNorm()(x, train=True)` inside `apply(..., mutable=["batch_stats"])`,
    or `BatchNorm()(x, train=False)` with nothing mutable.
    """

    momentum: float = DEFAULT_MOMENTUM
    epsilon: float = DEFAULT_EPSILON
    axis_name: str | None = None
    unbiased_running_var: bool = False  # True: PyTorch's running-variance convention

    @nn.compact
    def __call__(self, x, *, train: bool):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if not train:
            return batch_norm_eval(x, scale, bias, running_mean.value, running_var.value, self.epsilon)

        y, new_mean, new_var = batch_norm_train(
            x,
            scale,
            bias,
            running_mean.value,
            running_var.value,
            self.momentum,
            self.epsilon,
            # `init` runs outside any device mapping, so there is no axis to average over.
            axis_name=None if self.is_initializing() else self.axis_name,
            unbiased_running_var=self.unbiased_running_var,
        )
        # THE line where running statistics change. `init` only creates them
        # (as flax.linen.BatchNorm does), so a freshly initialized model starts
        # from mean 0, var 1 whatever batch was used to initialize it.
        if not self.is_initializing():
            running_mean.value, running_var.value = new_mean, new_var
        return y
