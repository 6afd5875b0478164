"""The readable BatchNorm equals flax.linen.BatchNorm, and follows its equations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.bn.batchnorm import BatchNorm, keras_bn, RunningAverage, batch_norm_eval, batch_norm_train, batch_statistics
from bnjax.nets.models import MLP, ConvNet
from bnjax.nets.recurrent import LSTM
from tolerances import assert_within, mean_round_off, variance_round_off

TOLERANCE = 1e-5


def random_setup(shape, seed=0):
    """Input plus non-trivial variables (scale, bias, running stats) for both modules."""
    keys = jax.random.split(jax.random.key(seed), 5)
    features = shape[-1]
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
    variables = {
        "params": {
            "scale": 1.0 + 0.5 * jax.random.normal(keys[1], (features,)),
            "bias": jax.random.normal(keys[2], (features,)),
        },
        "batch_stats": {
            "mean": jax.random.normal(keys[3], (features,)),
            "var": jax.random.uniform(keys[4], (features,), minval=0.5, maxval=2.0),
        },
    }
    return x, variables


def apply_ours(variables, x, train):
    return BatchNorm(momentum=0.9, epsilon=1e-3).apply(variables, x, use_running_average=not train, mutable=["batch_stats"] if train else False)


def apply_flax(variables, x, train):
    module = nn.BatchNorm(momentum=0.9, epsilon=1e-3)
    return module.apply(variables, x, use_running_average=not train, mutable=["batch_stats"] if train else False)


@pytest.mark.parametrize("shape", [(8, 5, 5, 4), (32, 10), (3, 7, 6, 16)])
def test_train_mode_equals_flax(shape):
    x, variables = random_setup(shape)
    ours, our_updates = apply_ours(variables, x, train=True)
    theirs, their_updates = apply_flax(variables, x, train=True)
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=TOLERANCE)
    for name in ("mean", "var"):
        np.testing.assert_allclose(our_updates["batch_stats"][name], their_updates["batch_stats"][name], atol=TOLERANCE)
        assert not np.allclose(our_updates["batch_stats"][name], variables["batch_stats"][name])


@pytest.mark.parametrize("shape", [(8, 5, 5, 4), (32, 10)])
def test_eval_mode_equals_flax(shape):
    x, variables = random_setup(shape)
    np.testing.assert_allclose(apply_ours(variables, x, False), apply_flax(variables, x, False), atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False])
def test_gradients_equal_flax(train):
    x, variables = random_setup((16, 4, 4, 6))
    weights = jax.random.normal(jax.random.key(9), x.shape)  # makes the loss depend on every output differently

    def loss(apply, params, x):
        out = apply({**variables, "params": params}, x, train)
        out = out[0] if train else out
        return jnp.sum(jnp.sin(out) * weights)

    for argnum in (0, 1):  # w.r.t. scale/bias, and w.r.t. the input
        ours = jax.grad(lambda p, x: loss(apply_ours, p, x), argnums=argnum)(variables["params"], x)
        theirs = jax.grad(lambda p, x: loss(apply_flax, p, x), argnums=argnum)(variables["params"], x)
        for our_leaf, their_leaf in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_allclose(our_leaf, their_leaf, atol=TOLERANCE, rtol=TOLERANCE)


def test_variables_have_flax_names_and_shapes():
    x = jnp.ones((2, 3, 3, 5))
    ours = BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    assert jax.tree_util.tree_map(jnp.shape, ours) == jax.tree_util.tree_map(jnp.shape, theirs)
    # Initial values: scale 1, bias 0, running mean 0, running var 1 (init does not update them).
    np.testing.assert_array_equal(ours["params"]["scale"], 1.0)
    np.testing.assert_array_equal(ours["params"]["bias"], 0.0)
    np.testing.assert_array_equal(ours["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(ours["batch_stats"]["var"], 1.0)


def test_defaults_are_flax_and_the_nets_use_keras():
    assert BatchNorm().momentum == 0.99 and BatchNorm().epsilon == 1e-5  # flax.linen.BatchNorm's
    assert keras_bn().momentum == 0.99 and keras_bn().epsilon == 1e-3  # the article's, which bnjax's nets use
    assert ConvNet().bn is None and MLP().bn is None and LSTM().bn is None  # None: keras_bn()


def test_pure_functions_follow_the_equations():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 3)).astype(np.float32)
    scale, bias = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, -1.0, 3.0], np.float32)
    running_mean, running_var = np.array([0.1, 0.2, 0.3], np.float32), np.array([1.0, 2.0, 3.0], np.float32)
    y, new_running = batch_norm_train(x, scale, bias, {"mean": running_mean, "var": running_var},
                                      RunningAverage(momentum=0.9), epsilon=1e-3)
    new_mean, new_var = new_running["mean"], new_running["var"]
    mean, biased_var = x.mean(0), x.var(0)  # numpy's var is the biased (divide-by-N) one
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(biased_var + 1e-3) * scale + bias, atol=1e-5)
    np.testing.assert_allclose(new_mean, 0.9 * running_mean + 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(new_var, 0.9 * running_var + 0.1 * biased_var, atol=1e-5)
    y_eval = batch_norm_eval(x, scale, bias, running_mean, running_var, epsilon=1e-3)
    np.testing.assert_allclose(y_eval, (x - running_mean) / np.sqrt(running_var + 1e-3) * scale + bias, atol=1e-5)


def test_axis_name_gives_global_batch_statistics():
    # vmap with an axis name stands in for 4 devices, each holding a quarter of the batch.
    x = jax.random.normal(jax.random.key(1), (4, 8, 3)) * 2.0 + 1.0
    mean, var = jax.vmap(lambda shard: batch_statistics(shard, axis_name="devices"), axis_name="devices")(x)
    full_mean, full_var = batch_statistics(x.reshape(32, 3))
    # Sums over 32 values in another order: float32 round-off (tests/tolerances.py).
    mean_tolerance, var_tolerance = mean_round_off(x.reshape(32, 3)), variance_round_off(x.reshape(32, 3))
    for shard in range(4):
        assert_within(mean[shard], full_mean, mean_tolerance)
        assert_within(var[shard], full_var, var_tolerance)
    local_mean, _ = batch_statistics(x[0])
    assert not np.allclose(local_mean, full_mean)  # without the axis name each shard differs


def test_unbiased_running_var_is_pytorchs_convention():
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    running = {"mean": zeros, "var": ones}
    _, biased = batch_norm_train(x, ones, zeros, running, RunningAverage(momentum=0.0))
    y, unbiased = batch_norm_train(x, ones, zeros, running, RunningAverage(momentum=0.0, unbiased_var=True))
    biased, unbiased = biased["var"], unbiased["var"]
    np.testing.assert_allclose(biased, x.var(0), rtol=1e-5)
    np.testing.assert_allclose(unbiased, x.var(0, ddof=1), rtol=1e-5)
    # The batch itself is still normalized with the biased variance.
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-5)  # flax's epsilon, the default
