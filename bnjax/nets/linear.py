"""The deep linear network of Santurkar, Tsipras, Ilyas and Madry ("How Does
Batch Normalization Help Optimization?", NeurIPS 2018), where their
internal-covariate-shift result is strongest: `depth` fully connected layers
of `width` units with no nonlinearity, trained by full-batch gradient
descent on Gaussian data (`gaussian_regression`). With BN, each hidden layer
is Dense (no bias) -> BatchNorm; the output layer is a plain Dense.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax.bn.batchnorm import BatchNorm
from bnjax.nets.models import bn_of
from bnjax.support.checks import is_integer


class DeepLinearNet(nn.Module):
    """(N, inputs) -> (N, outputs); layers named Dense_0 .. Dense_{depth-1}
    and, with BN, BatchNorm_0 .. BatchNorm_{depth-2} after the hidden ones."""

    depth: int = 25
    width: int = 10
    outputs: int = 10
    batch_norm: bool = False
    bn: BatchNorm | None = None  # BN's settings, as ConvNet's (None: Keras's)

    def __post_init__(self):
        for name in ("depth", "width", "outputs"):
            if not is_integer(getattr(self, name)) or getattr(self, name) < (2 if name == "depth" else 1):
                least = 2 if name == "depth" else 1
                raise ValueError(f"{name} must be an integer >= {least}, got {getattr(self, name)!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        for _ in range(self.depth - 1):
            x = nn.Dense(self.width, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = bn_of(self).copy()(x, use_running_average=not train)
        return nn.Dense(self.outputs)(x)

    def layer_groups(self) -> list[tuple[str, ...]]:
        """Each layer's top-level parameter names, input side first: what
        `bnjax.training.landscape.gradient_shift` takes."""
        return [(f"Dense_{index}",) + ((f"BatchNorm_{index}",) if self.batch_norm and index < self.depth - 1 else ())
                for index in range(self.depth)]


def gaussian_regression(key, examples: int = 1000, inputs: int = 10, outputs: int = 10):
    """(x, y): x ~ N(0, I) of shape (examples, inputs), y = x A^T with A a
    fixed Gaussian (outputs, inputs) matrix of entries N(0, 1 / inputs), so
    that y has about unit variance: a linear target a deep linear net can fit."""
    x_key, a_key = jax.random.split(key)
    x = jax.random.normal(x_key, (examples, inputs))
    a = jax.random.normal(a_key, (outputs, inputs)) / jnp.sqrt(inputs)
    return x, x @ a.T
