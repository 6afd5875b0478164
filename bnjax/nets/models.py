"""The article's MNIST CNN, with and without Batch Normalization.

Layer for layer as the article's notebook (Keras 2.0.8) built it:

    Conv 32 3x3 VALID -> max-pool 2x2 -> Conv 64 3x3 VALID -> max-pool 2x2
    -> Conv 64 3x3 VALID -> flatten (3*3*64 = 576) -> Dense 64 -> Dense 10

Plain: every Conv/Dense has a bias, hidden layers are followed by the activation.
BN: every Conv/Dense, the output layer included, has no bias and is followed by
BatchNorm, *then* the activation (none on the output: softmax is in the loss).
A bias right before BN is pointless: BN subtracts the batch mean, which removes
any constant shift, so its gradient is exactly zero.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from bnjax.bn.batchnorm import BatchNorm, keras_bn
from bnjax.nets.conv import CONV_IMPLEMENTATIONS, conv_as_matmul
from bnjax.support.checks import check_choice

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "elu": nn.elu,
    "gelu": nn.gelu,
}

# Where BN sits in a hidden unit: "before" the activation (the article and the
# BN paper: layer -> BN -> activation) or "after" it (layer -> activation -> BN).
BN_POSITIONS = ("before", "after")

# Keras initializes kernels with glorot_uniform; Flax's own default is lecun_normal.
KERNEL_INITS: dict[str, Callable] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
}


def bn_of(holder) -> BatchNorm:
    """The BN settings every BN layer copies, of a net or a run (anything with
    a `bn`): its `bn`, or Keras's, the article's (`keras_bn`), where that is None."""
    return holder.bn or keras_bn()


def get_activation(name: str) -> Callable:
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def get_kernel_init(name: str) -> Callable:
    check_choice("kernel_init", name, KERNEL_INITS)
    return KERNEL_INITS[name]


def at_least_float32(logits):
    """bfloat16 logits as float32, so that the loss is computed in float32; wider ones as they are."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped, as in Keras).

    (N, H, W, C) -> (N, H // 2, W // 2, C). Equal to `nn.max_pool(x, (2, 2), (2, 2))`,
    written as reshape + max because XLA:CPU compiles the backward pass of that
    plain reduction much faster than that of a windowed reduce.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvNet(nn.Module):
    """The article's CNN. `model.apply(variables, images, train=...)` on
    (N, 28, 28, 1) float32 images in [0, 1] returns (N, 10) logits."""

    batch_norm: bool = False
    activation: str = "relu"
    kernel_init: str = "glorot_uniform"
    # BN's settings as one value: every BN of the net is a copy of this layer
    # (`bn.copy()`, named BatchNorm_0, BatchNorm_1, ... as any BatchNorm).
    # E.g. `bn=BatchNorm(momentum=0.9, epsilon=1e-5)`, checked when it is made.
    # None: the article's, Keras's momentum 0.99 and epsilon 1e-3 (`keras_bn`).
    bn: BatchNorm | None = None
    # Ablations of the article's keypoints (experiments/ablations.py); the
    # defaults are the article's BN net.
    bn_position: str = "before"  # BN_POSITIONS; the output layer has no activation, so BN stays last there
    bn_use_bias: bool = False    # True: Conv/Dense keep their bias under BN too
    # The dtype of the convolutions, matrix products and activations (None:
    # that of the inputs and parameters, as flax's; parameters stay float32
    # and BN computes its statistics in float32 or wider either way).
    dtype: Any = None
    # How the convolutions are computed (nets/conv.py): "lax" (XLA's
    # convolution) or "matmul" (patches and one matrix product, which stays a
    # batched matrix product when runs are stacked). Same parameters either way.
    conv_implementation: str = "lax"

    @nn.compact
    def __call__(self, x, *, train: bool):
        activation = get_activation(self.activation)
        kernel_init = get_kernel_init(self.kernel_init)
        check_choice("bn_position", self.bn_position, BN_POSITIONS)
        check_choice("conv_implementation", self.conv_implementation, CONV_IMPLEMENTATIONS)
        conv_function = conv_as_matmul if self.conv_implementation == "matmul" else jax.lax.conv_general_dilated

        def linear_unit(layer: nn.Module, x, hidden: bool):
            # Plain: layer(+bias) -> activation. BN: layer(no bias) -> BN -> activation.
            x = layer(x)
            if not self.batch_norm:
                return activation(x) if hidden else x
            if not hidden:
                return bn_of(self).for_output().copy()(x, use_running_average=not train)
            batch_norm = bn_of(self).copy()
            if self.bn_position == "after":
                return batch_norm(activation(x), use_running_average=not train)
            return activation(batch_norm(x, use_running_average=not train))

        use_bias = not self.batch_norm or self.bn_use_bias
        conv = lambda features: nn.Conv(features, (3, 3), padding="VALID", use_bias=use_bias, kernel_init=kernel_init,
                                        conv_general_dilated=conv_function, dtype=self.dtype)
        dense = lambda features: nn.Dense(features, use_bias=use_bias, kernel_init=kernel_init, dtype=self.dtype)

        x = linear_unit(conv(32), x, hidden=True)   # (N, 26, 26, 32)
        x = max_pool_2x2(x)                          # (N, 13, 13, 32)
        x = linear_unit(conv(64), x, hidden=True)   # (N, 11, 11, 64)
        x = max_pool_2x2(x)                          # (N, 5, 5, 64)
        x = linear_unit(conv(64), x, hidden=True)   # (N, 3, 3, 64)
        x = x.reshape(x.shape[0], -1)                # (N, 576)
        x = linear_unit(dense(64), x, hidden=True)  # (N, 64)
        return at_least_float32(linear_unit(dense(10), x, hidden=False))  # (N, 10) logits


def count_params(params) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))


class MLP(nn.Module):
    """The BN paper's MNIST net (Ioffe & Szegedy 2015, section 4.1): 3 fully
    connected hidden layers of 100 units and a 10-way output. With BN, each
    hidden layer is Dense (no bias) -> BatchNorm -> activation, as in the paper
    (BN right before the nonlinearity). (N, 28, 28, 1) or (N, 784) in, (N, 10)
    logits out. The output layer keeps its bias and has no BN."""

    batch_norm: bool = False
    activation: str = "sigmoid"
    hidden_units: tuple[int, ...] = (100, 100, 100)
    kernel_init: str = "glorot_uniform"
    bn: BatchNorm | None = None  # BN's settings, as ConvNet's
    dtype: Any = None  # of the matrix products and activations, as ConvNet's

    @nn.compact
    def __call__(self, x, *, train: bool):
        activation = get_activation(self.activation)
        kernel_init = get_kernel_init(self.kernel_init)
        x = x.reshape(x.shape[0], -1)  # (N, 784)
        for units in self.hidden_units:
            x = nn.Dense(units, use_bias=not self.batch_norm, kernel_init=kernel_init, dtype=self.dtype)(x)
            if self.batch_norm:
                x = bn_of(self).copy()(x, use_running_average=not train)
            # The input to this layer's nonlinearity, which the paper's figure 1(b, c) tracks.
            self.sow("intermediates", "sigmoid_input", x)
            x = activation(x)
        return at_least_float32(nn.Dense(10, kernel_init=kernel_init, dtype=self.dtype)(x))
