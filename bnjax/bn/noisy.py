"""Noisy BN: BN followed by noise that moves its output's distribution at
every training step, the experiment with which Santurkar, Tsipras, Ilyas and
Madry ("How Does Batch Normalization Help Optimization?", NeurIPS 2018) ask
whether BN helps by keeping layer inputs' distributions steady.

In train mode each feature's BN output y is shifted and rescaled,

    y' = scale * y + shift,   shift ~ U(-noise_shift, noise_shift),
                              scale = 2 ** U(-noise_log2_scale, noise_log2_scale),

with shift and scale drawn afresh at every call (per feature, the same for
every example of the batch: the distribution the next layer sees moves,
with a non-zero mean and a non-unit variance, by a different amount at
each step). The draws come from a key drawn once at `init` (from the
model's "params" rng: each run its own noise) and a step counter, both kept
in `batch_stats` ("noise_key", "noise_step"), so a run is reproducible and
stays a pure function of its state. Eval mode adds no noise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax.bn.batchnorm import BatchNorm
from bnjax.support.checks import is_real


class NoisyBatchNorm(BatchNorm):
    """`BatchNorm` (every setting of it) followed by the module doc's noise."""

    noise_shift: float = 1.0
    noise_log2_scale: float = 1.0

    def __post_init__(self):
        for name in ("noise_shift", "noise_log2_scale"):
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        y = super().__call__(x, use_running_average, mask=mask)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        key = self.variable("batch_stats", "noise_key", lambda: jax.random.key_data(self.make_rng("params")))
        step = self.variable("batch_stats", "noise_step", lambda: jnp.zeros((), jnp.int32))
        if use_running_average or self.is_initializing():
            return y
        shift, scale = self.noise(key.value, step.value, y.shape[-1])
        step.value = step.value + 1
        return jnp.asarray(y * scale + shift, y.dtype)

    def noise(self, key_data, step, features: int):
        """(shift, scale), each (features,), of train-mode call number `step`."""
        shift_key, scale_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), step))
        shift = jax.random.uniform(shift_key, (features,), minval=-self.noise_shift, maxval=self.noise_shift)
        log2_scale = jax.random.uniform(scale_key, (features,), minval=-self.noise_log2_scale,
                                        maxval=self.noise_log2_scale)
        return shift, jnp.exp2(log2_scale)
