"""Santurkar et al.'s measurements (bnjax/training/landscape.py) on cases
whose answers are known in closed form, and noisy BN (bnjax/bn/noisy.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.bn.batchnorm import BatchNorm
from bnjax.bn.noisy import NoisyBatchNorm
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.landscape import gradient_line, gradient_shift, layer_inputs, moments_shift

RNG = np.random.default_rng(0)


def test_the_effective_smoothness_of_a_quadratic_along_its_gradient():
    # L = 1/2 theta^T A theta: g = A theta, moving by eta g changes the gradient
    # by eta A^2 theta over a distance eta |A theta|: beta = |A^2 theta| / |A theta|,
    # the same for every step size; the losses are those of theta - eta A theta.
    a = np.diag([1.0, 10.0, 3.0]).astype(np.float32)
    theta = RNG.normal(size=3).astype(np.float32)
    loss_fn = lambda params: 0.5 * params @ (a @ params)  # noqa: E731
    steps = (0.01, 0.05, 0.1)
    measured = gradient_line(loss_fn, jnp.asarray(theta), steps)
    beta = np.linalg.norm(a @ a @ theta) / np.linalg.norm(a @ theta)
    np.testing.assert_allclose(measured["beta"], beta, rtol=1e-5)
    np.testing.assert_allclose(measured["gradient_changes"],
                               [eta * np.linalg.norm(a @ a @ theta) for eta in steps], rtol=1e-5)
    expected_losses = [0.5 * (theta - eta * a @ theta) @ a @ (theta - eta * a @ theta) for eta in steps]
    np.testing.assert_allclose(measured["losses"], expected_losses, rtol=1e-5)
    all_losses = expected_losses + [0.5 * theta @ a @ theta]
    np.testing.assert_allclose(measured["loss_spread"], max(all_losses) - min(all_losses), rtol=1e-4)
    # An isotropic quadratic's smoothness is its curvature, whatever the direction.
    isotropic = gradient_line(lambda params: 1.5 * params @ params, jnp.asarray(theta), steps)
    np.testing.assert_allclose(isotropic["beta"], 3.0, rtol=1e-5)
    assert not np.isclose(measured["beta"], 10.0, rtol=1e-2)  # not the largest curvature: the one along g


def test_the_gradient_shift_of_a_linear_layer_when_the_layer_below_moves():
    # L = 1/2 |W2 W1 x - y|^2: dL/dW2 = (W2 W1 x - y)(W1 x)^T, evaluated with W1
    # (G) and with the updated W1' (G'); flax's Dense kernels are W^T.
    x, y = RNG.normal(size=4), RNG.normal(size=2)
    w1, w2 = RNG.normal(size=(3, 4)), RNG.normal(size=(2, 3))
    w1_next = w1 + 0.3 * RNG.normal(size=(3, 4))

    def loss_fn(params):
        hidden = x @ params["Dense_0"]["kernel"]
        return 0.5 * jnp.sum(jnp.square(hidden @ params["Dense_1"]["kernel"] - y))

    params = {"Dense_0": {"kernel": jnp.asarray(w1.T, jnp.float32)}, "Dense_1": {"kernel": jnp.asarray(w2.T, jnp.float32)}}
    updated = {"Dense_0": {"kernel": jnp.asarray(w1_next.T, jnp.float32)},
               "Dense_1": {"kernel": jnp.asarray(w2.T + 5.0, jnp.float32)}}  # the layer's own update is not used
    gradient = lambda w_below: np.outer(w2 @ w_below @ x - y, w_below @ x).T  # noqa: E731  (kernel layout)
    g, g_next = gradient(w1), gradient(w1_next)
    shift = gradient_shift(loss_fn, params, updated, [("Dense_0",), ("Dense_1",)])
    assert list(shift) == ["Dense_1"]
    np.testing.assert_allclose(shift["Dense_1"]["l2"], np.linalg.norm(g - g_next), rtol=1e-4)
    np.testing.assert_allclose(shift["Dense_1"]["cosine"],
                               np.sum(g * g_next) / np.linalg.norm(g) / np.linalg.norm(g_next), rtol=1e-4)
    unmoved = gradient_shift(loss_fn, params, params, [("Dense_0",), ("Dense_1",)])
    assert float(unmoved["Dense_1"]["l2"]) == 0.0 and np.isclose(unmoved["Dense_1"]["cosine"], 1.0)


def test_moments_shift_measures_a_shifted_and_rescaled_input():
    before = jnp.asarray(RNG.normal(size=(500, 3)), jnp.float32)
    after = 2.0 * before + 1.0  # mean 2 m + 1, variance 4 v
    mean, var = np.asarray(before).mean(0), np.asarray(before).var(0)
    shift = moments_shift(before, after)
    np.testing.assert_allclose(shift["mean_shift"], np.mean(np.abs(mean + 1.0)) / np.sqrt(var.mean()), rtol=1e-4)
    np.testing.assert_allclose(shift["variance_shift"], 3.0, rtol=1e-4)
    assert float(moments_shift(before, before)["mean_shift"]) == 0.0


def test_layer_inputs_are_what_each_layer_reads():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = jnp.tanh(nn.Dense(3)(x))  # Dense_0 (named in the order the layers are made)
            return nn.Dense(2)(hidden)

    x = jnp.ones((5, 4))
    variables = Net().init(jax.random.key(0), x)
    inputs = layer_inputs(lambda: Net().apply(variables, x))
    np.testing.assert_array_equal(inputs["Dense_0"], x)
    hidden = jnp.tanh(x @ variables["params"]["Dense_0"]["kernel"] + variables["params"]["Dense_0"]["bias"])
    np.testing.assert_allclose(inputs["Dense_1"], hidden, rtol=1e-6)


def test_noisy_bn_shifts_and_rescales_each_feature_afresh_at_every_training_step():
    x = jnp.asarray(RNG.normal(size=(16, 6)), jnp.float32)
    noisy, clean = NoisyBatchNorm(momentum=0.9), BatchNorm(momentum=0.9)
    variables = noisy.init(jax.random.key(0), x, use_running_average=False)
    clean_variables = {"params": variables["params"],
                       "batch_stats": {k: v for k, v in variables["batch_stats"].items() if k in ("mean", "var")}}
    y_clean, _ = clean.apply(clean_variables, x, use_running_average=False, mutable=["batch_stats"])
    y, updates = noisy.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    scale = (y[1] - y[0]) / (y_clean[1] - y_clean[0])  # per feature: y = scale * y_clean + shift
    shift = y[0] - scale * y_clean[0]
    np.testing.assert_allclose(y, y_clean * scale + shift, atol=1e-5)
    assert np.all((scale >= 0.5 - 1e-5) & (scale <= 2.0 + 1e-5)) and np.all(np.abs(shift) <= 1.0 + 1e-5)
    assert np.std(np.asarray(shift)) > 0.1  # a different draw per feature
    assert int(updates["batch_stats"]["noise_step"]) == 1
    np.testing.assert_array_equal(updates["batch_stats"]["mean"],
                                  clean.apply(clean_variables, x, use_running_average=False,
                                              mutable=["batch_stats"])[1]["batch_stats"]["mean"])
    y_next, _ = noisy.apply({**variables, **updates}, x, use_running_average=False, mutable=["batch_stats"])
    assert float(jnp.abs(y_next - y).max()) > 0.1  # the next step, the next draw
    # Eval mode: BN's own output, no noise; another init key, other noise.
    np.testing.assert_array_equal(noisy.apply(variables, x, use_running_average=True),
                                  clean.apply(clean_variables, x, use_running_average=True))
    other = noisy.init(jax.random.key(1), x, use_running_average=False)
    assert not np.array_equal(other["batch_stats"]["noise_key"], variables["batch_stats"]["noise_key"])


@pytest.mark.parametrize("settings, message", [
    (dict(noise_shift=-1.0), "noise_shift must be a non-negative number, got -1.0"),
    (dict(noise_log2_scale="big"), "noise_log2_scale must be a non-negative number, got 'big'"),
])
def test_bad_noise_is_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        NoisyBatchNorm(**settings)


def test_bn_noise_needs_bn_and_the_cnn_or_mlp():
    noisy = keras_bn(NoisyBatchNorm)
    assert isinstance(TrainConfig(batch_norm=True, bn=noisy).bn_layer(), NoisyBatchNorm)
    with pytest.raises(ValueError, match=r"^bn=NoisyBatchNorm\(epsilon=0.001\) is a BN setting, and this run has no BN"):
        TrainConfig(bn=noisy)
    with pytest.raises(ValueError, match="^the BN-LSTM's per-step BN is a plain BatchNorm, got NoisyBatchNorm$"):
        dataclasses.replace(TrainConfig(model="lstm", activation="tanh"), batch_norm=True, bn=noisy)
