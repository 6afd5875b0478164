"""Noisy BN: BN followed by noise that moves its output's distribution at
every training step, the experiment with which Santurkar, Tsipras, Ilyas and
Madry ("How Does Batch Normalization Help Optimization?", NeurIPS 2018) ask
whether BN helps by keeping layer inputs' distributions steady.

In train mode each feature's BN output y is rescaled and shifted,

    y' = scale * y + shift,

with the feature's (shift, scale) drawn afresh at every call:

    shift ~ U(-noise_shift, noise_shift), and
    scale = 2 ** U(-noise_log2_scale, noise_log2_scale)   noise_scale_law "log2_uniform"
    scale ~ U(1, noise_scale_max)                          noise_scale_law "uniform"

and, with `noise_jitter` r > 0, each value (example and position) its own
draw around the feature's: shift_i ~ U(shift - r, shift + r), scale_i ~
U(scale - r, scale + r). The paper's Algorithm 1 is "uniform" with
n_mu = noise_shift = 0.5, n_sigma = noise_scale_max = 1.25 and r_mu = r_sigma
= noise_jitter = 0.1, on the hidden layers' BN only (`noise_logits` False):
`santurkar_noisy_bn()`. (The Algorithm's per-value draws are uniform around
the step's, as we read it.) With `normalize` False the layer does not
normalize: y = scale_param * x + bias_param, then the noise: the paper's
control, the same noise on the plain net (`santurkar_noisy_bn(normalize=False)`
in each BN's place, the logits' then a plain affine layer).
`without_noise()` is the same layer with the noise set to zero, what a
noisy net computes with its noise off. The defaults are bnjax's first noisy BN (the
same draw for every value of a feature, a scale that also shrinks, the
logits' BN noisy too); experiments/why_bn_works trains the paper's.

The draws come from a key drawn once at `init` (from the model's "params"
rng: each run its own noise) and a step counter, both kept in `batch_stats`
("noise_key", "noise_step"), so a run is reproducible and stays a pure
function of its state. Eval mode adds no noise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax.bn.batchnorm import BatchNorm, keras_bn
from bnjax.support.checks import check_bool, check_choice, is_real

NOISE_SCALE_LAWS = ("log2_uniform", "uniform")


class NoisyBatchNorm(BatchNorm):
    """`BatchNorm` (every setting of it) followed by the module doc's noise."""

    noise_shift: float = 1.0
    noise_log2_scale: float = 1.0
    noise_scale_law: str = "log2_uniform"
    noise_scale_max: float = 1.25
    noise_jitter: float = 0.0
    noise_logits: bool = True
    normalize: bool = True

    def __post_init__(self):
        for name in ("noise_shift", "noise_log2_scale", "noise_jitter"):
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        check_choice("noise_scale_law", self.noise_scale_law, NOISE_SCALE_LAWS)
        if not is_real(self.noise_scale_max) or self.noise_scale_max < 1:
            raise ValueError(f"noise_scale_max must be a number >= 1 (scale ~ U(1, noise_scale_max)), "
                             f"got {self.noise_scale_max!r}")
        check_bool("noise_logits", self.noise_logits)
        check_bool("normalize", self.normalize)
        if not self.normalize and self.axis != -1:
            raise ValueError(f"normalize=False (the noise on a plain net) takes features on the last axis, "
                             f"axis -1, got axis={self.axis!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        y = super().__call__(x, use_running_average, mask=mask) if self.normalize else self.affine(x)
        key = self.variable("batch_stats", "noise_key", lambda: jax.random.key_data(self.make_rng("params")))
        step = self.variable("batch_stats", "noise_step", lambda: jnp.zeros((), jnp.int32))
        if use_running_average or self.is_initializing():
            return y
        shift, scale = self.noise(key.value, step.value, y.shape)
        step.value = step.value + 1
        return jnp.asarray(y * scale + shift, y.dtype)

    def affine(self, x):
        """What the layer computes with `normalize` False: x times its learned
        scale plus its learned bias (as BN's, per feature on the last axis)."""
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale else 1
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias else 0
        return x * scale + bias

    def noise(self, key_data, step, shape):
        """(shift, scale) of train-mode call number `step` on an output of
        `shape`: each (features,), or `shape` itself with `noise_jitter`."""
        features = shape[-1]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
        shift_key, scale_key = jax.random.split(step_key)
        shift = jax.random.uniform(shift_key, (features,), minval=-self.noise_shift, maxval=self.noise_shift)
        if self.noise_scale_law == "uniform":
            scale = jax.random.uniform(scale_key, (features,), minval=1.0, maxval=self.noise_scale_max)
        else:
            scale = jnp.exp2(jax.random.uniform(scale_key, (features,), minval=-self.noise_log2_scale,
                                                maxval=self.noise_log2_scale))
        if self.noise_jitter == 0:
            return shift, scale
        shift_jitter_key, scale_jitter_key = jax.random.split(jax.random.fold_in(step_key, 1))
        jitter = lambda key: jax.random.uniform(key, shape, minval=-self.noise_jitter, maxval=self.noise_jitter)
        return shift + jitter(shift_jitter_key), scale + jitter(scale_jitter_key)

    def without_noise(self) -> NoisyBatchNorm:
        """This layer with zero noise (shift 0, scale exactly 1, no jitter): its
        output is BN's (or, with `normalize` False, the affine layer's) alone."""
        return self.clone(noise_shift=0.0, noise_log2_scale=0.0, noise_scale_max=1.0, noise_jitter=0.0, parent=None)

    def for_output(self) -> BatchNorm:
        """The layer the net's output BN (the logits') copies: this one, or,
        with `noise_logits` False, BatchNorm with the same BN settings (with
        `normalize` also False: this layer without noise, an affine layer)."""
        if self.noise_logits:
            return self
        if not self.normalize:
            return self.without_noise()
        return BatchNorm(**{name: getattr(self, name) for name in BatchNorm.__dataclass_fields__
                            if name not in ("parent", "name")}, parent=None)


def santurkar_noisy_bn(**changes: Any) -> NoisyBatchNorm:
    """The paper's Algorithm 1 at its constants (module doc), with Keras's BN
    settings as the article's nets use them; `changes` to any setting."""
    settings = dict(noise_shift=0.5, noise_scale_law="uniform", noise_scale_max=1.25, noise_jitter=0.1,
                    noise_logits=False)
    return keras_bn(NoisyBatchNorm, **{**settings, **changes})
