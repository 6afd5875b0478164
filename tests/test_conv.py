"""`conv_as_matmul` (bnjax/nets/conv.py) is lax's convolution, run by run, and
stays a batched matrix product when runs are stacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnjax.nets.conv import conv_as_matmul
from bnjax.nets.models import ConvNet
from tolerances import assert_within, network_round_off, sum_round_off

RUNS = 3
# (runs, batch, height, width, channels) images and (runs, 3, 3, channels, features) kernels:
# the article's second convolution's shapes, a different kernel per run.
IMAGES = jax.random.normal(jax.random.key(0), (RUNS, 4, 13, 13, 32))
KERNELS = jax.random.normal(jax.random.key(1), (RUNS, 3, 3, 32, 64)) * 0.1
# The sums each value is (tests/tolerances.py takes round-off to grow with the
# square root of their length): an output sums 3 x 3 x 32 = 288 products, an
# input gradient 3 x 3 x 64 = 576, a kernel gradient 4 x 11 x 11 = 484 (batch
# and positions).
TERMS = {"output": 288, "input-gradient": 576, "kernel-gradient": 484}


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
        expected, expected_gradient = lax_conv(IMAGES[run], KERNELS[run]), lax_gradient(IMAGES[run], KERNELS[run])
        assert_within(stacked[run], expected, sum_round_off(TERMS["output"], np.abs(expected).max()))
        gradient_tolerance = sum_round_off(TERMS[["input-gradient", "kernel-gradient"][argnums]],
                                           np.abs(expected_gradient).max())
        assert_within(gradients[run], expected_gradient, gradient_tolerance)
        # The next run's kernel (a wrong one) lies far outside it.
        assert np.abs(lax_conv(IMAGES[run], KERNELS[(run + 1) % RUNS]) - expected).max() > 100 * sum_round_off(
            TERMS["output"], np.abs(expected).max())


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
    # Two float32 evaluations of a five-layer net: within the net's round-off
    # (tests/tolerances.py), relative to each compared array's largest value.
    relative = network_round_off(lax_net, variables, images)
    for train in (True, False):
        outputs = [jax.jit(lambda v, x: net.apply(v, x, train=train, mutable=["batch_stats"] if train else False))(
                   variables, images) for net in (lax_net, matmul_net)]
        jax.tree_util.tree_map(lambda a, b: assert_within(a, b, relative * np.abs(b).max()), *outputs)
    # A wrong computation lies far outside it: Conv_1's kernel transposed (its 3 x 3 taps mirrored).
    wrong = jax.tree_util.tree_map(lambda a: a, variables)
    wrong["params"]["Conv_1"]["kernel"] = variables["params"]["Conv_1"]["kernel"][::-1, ::-1]
    logits, wrong_logits = (matmul_net.apply(v, images, train=False) for v in (variables, wrong))
    assert np.abs(np.asarray(wrong_logits) - np.asarray(logits)).max() > 10 * relative * np.abs(logits).max()


def test_what_it_cannot_compute_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"conv_as_matmul: stride 1 only, got \(2, 2\)"):
        conv_as_matmul(IMAGES[0], KERNELS[0], (2, 2), "VALID")
    with pytest.raises(ValueError, match="VALID padding only, got 'SAME'"):
        conv_as_matmul(IMAGES[0], KERNELS[0], (1, 1), "SAME")
    with pytest.raises(ValueError, match="unknown conv_implementation 'cudnn'; allowed: lax, matmul"):
        ConvNet(conv_implementation="cudnn").init(jax.random.key(0), IMAGES[0, :1, :, :, :1], train=False)
