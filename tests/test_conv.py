"""`conv_as_matmul` (bnjax/conv.py) is lax's convolution, run by run, and
stays a batched matrix product when runs are stacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnjax.conv import conv_as_matmul
from bnjax.models import ConvNet

RUNS = 3
# (runs, batch, height, width, channels) images and (runs, 3, 3, channels, features) kernels:
# the article's second convolution's shapes, a different kernel per run.
IMAGES = jax.random.normal(jax.random.key(0), (RUNS, 4, 13, 13, 32))
KERNELS = jax.random.normal(jax.random.key(1), (RUNS, 3, 3, 32, 64)) * 0.1
# float32 sums of 288 products in another order, measured (jax 0.10.2, CPU):
# outputs within 5.2e-6 of values up to 9.3; input gradients within 3.9e-6 of
# values up to 7; kernel gradients (sums over the batch too) within 4.4e-5 of
# values up to 67. Gradients are checked with atol 1e-4.
RTOL, ATOL = 1e-5, 1e-5


def lax_conv(images, kernel):
    return lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def loss(conv, images, kernel):
    return jnp.sum(jnp.sin(conv(images, kernel)))  # a gradient that varies per output element


@pytest.mark.parametrize("argnums", [0, 1], ids=["input-gradient", "kernel-gradient"])
def test_equals_lax_convolution_run_by_run_forward_and_gradients(argnums):
    stacked = jax.jit(jax.vmap(conv_as_matmul))(IMAGES, KERNELS)
    gradients = jax.jit(jax.vmap(jax.grad(lambda x, k: loss(conv_as_matmul, x, k), argnums)))(IMAGES, KERNELS)
    lax_gradient = jax.jit(jax.grad(lambda x, k: loss(lax_conv, x, k), argnums))
    for run in range(RUNS):  # each run against lax's convolution on that run alone
        np.testing.assert_allclose(stacked[run], lax_conv(IMAGES[run], KERNELS[run]), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(gradients[run], lax_gradient(IMAGES[run], KERNELS[run]), rtol=RTOL, atol=ATOL * 10)


def convolutions_in(jaxpr) -> list:
    """Every conv_general_dilated equation in a jaxpr, those in nested jitted functions included."""
    found = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            found.append(equation)
        for value in equation.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                found += convolutions_in(inner)
    return found


def test_stacked_runs_train_without_grouped_convolutions():
    def train_step_gradients(conv):
        return jax.make_jaxpr(jax.vmap(jax.grad(lambda x, k: loss(conv, x, k), (0, 1))))(IMAGES, KERNELS).jaxpr

    # lax's convolution under vmap over per-run kernels: grouped (the slow case this module avoids) ...
    grouped = convolutions_in(train_step_gradients(lax_conv))
    assert grouped and any(eq.params["feature_group_count"] == RUNS or eq.params["batch_group_count"] == RUNS
                           for eq in grouped)
    # ... patches and matrix products: no convolution at all, forward or backward.
    assert convolutions_in(train_step_gradients(conv_as_matmul)) == []


@pytest.mark.slow
def test_the_convnet_has_the_same_parameters_and_outputs_either_way():
    images = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
    lax_net, matmul_net = ConvNet(batch_norm=True), ConvNet(batch_norm=True, conv_implementation="matmul")
    variables = jax.jit(lambda key: lax_net.init(key, images, train=False))(jax.random.key(3))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda key: matmul_net.init(key, images, train=False), jax.random.key(3)))
    for train in (True, False):
        outputs = [jax.jit(lambda v, x: net.apply(v, x, train=train, mutable=["batch_stats"] if train else False))(
                   variables, images) for net in (lax_net, matmul_net)]
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), *outputs)


def test_what_it_cannot_compute_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"conv_as_matmul: stride 1 only, got \(2, 2\)"):
        conv_as_matmul(IMAGES[0], KERNELS[0], (2, 2), "VALID")
    with pytest.raises(ValueError, match="VALID padding only, got 'SAME'"):
        conv_as_matmul(IMAGES[0], KERNELS[0], (1, 1), "SAME")
    with pytest.raises(ValueError, match="unknown conv_implementation 'cudnn'; allowed: lax, matmul"):
        ConvNet(conv_implementation="cudnn").init(jax.random.key(0), IMAGES[0, :1, :, :, :1], train=False)
