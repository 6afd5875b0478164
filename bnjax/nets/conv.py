"""Convolutions for a leading runs axis: patches and one matrix product.

`jax.vmap` of `lax.conv_general_dilated` over runs whose *weights* differ
becomes one grouped convolution (`feature_group_count` = runs), and its weight
gradient a `batch_group_count` convolution: cuDNN runs those slowly (jax#13800;
jax#26568, jax#15339 measured vmapped CNN ensembles slower than a loop over the
nets). `conv_as_matmul` computes the same convolution as patches gathered from
shifted slices and one `einsum` with the kernel: under `vmap` that is a batched
matrix product over the runs axis, and its input and weight gradients are
batched matrix products too.

Which one a model uses is `ConvNet(conv_implementation=...)`; which one the
loop picks for a program of stacked runs is `Strategy.stacked_conv`
(`Strategy.stacked_conv`), per backend. The tests hold `conv_as_matmul` to
`lax.conv_general_dilated` run by run, forward and gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

CONV_IMPLEMENTATIONS = ("lax", "matmul")


def conv_as_matmul(lhs, rhs, window_strides=(1, 1), padding="VALID", *, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
    """`lax.conv_general_dilated` for what the article's nets use, as patches
    and one matrix product: lhs (N, H, W, C) images, rhs (kh, kw, C, F)
    kernel, stride 1, VALID padding, no dilation, no groups; returns
    (N, H - kh + 1, W - kw + 1, F). The signature is lax's (the options after
    `padding` by keyword, as `flax.linen.Conv` passes them), so flax's Conv
    takes it as its `conv_general_dilated`; anything else raises a ValueError."""
    _check_supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count)
    kernel_h, kernel_w, channels, features = rhs.shape
    out_h, out_w = lhs.shape[1] - kernel_h + 1, lhs.shape[2] - kernel_w + 1
    # Patch element (i, j, c) sits at index (i * kernel_w + j) * channels + c,
    # the order of rhs.reshape(kernel_h * kernel_w * channels, features).
    patches = jnp.concatenate([lhs[:, i:i + out_h, j:j + out_w, :]
                               for i in range(kernel_h) for j in range(kernel_w)], axis=-1)
    return jnp.einsum("nhwk,kf->nhwf", patches, rhs.reshape(kernel_h * kernel_w * channels, features),
                      precision=precision)


def _check_supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count):
    def ones(value):
        return value is None or all(v == 1 for v in value)

    problems = []
    if lhs.ndim != 4 or rhs.ndim != 4:
        problems.append(f"2-D convolutions only, got lhs {lhs.shape} and rhs {rhs.shape}")
    if not ones(window_strides):
        problems.append(f"stride 1 only, got {tuple(window_strides)}")
    if not (padding == "VALID" or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))):
        problems.append(f"VALID padding only, got {padding!r}")
    if not ones(lhs_dilation) or not ones(rhs_dilation):
        problems.append(f"no dilation, got lhs {lhs_dilation} and rhs {rhs_dilation}")
    if feature_group_count != 1:
        problems.append(f"feature_group_count 1 only, got {feature_group_count}")
    if dimension_numbers is not None:
        numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")):
            problems.append(f"NHWC images and HWIO kernels only, got {dimension_numbers}")
    if problems:
        raise ValueError(f"conv_as_matmul: {'; '.join(problems)} (use conv_implementation='lax')")
