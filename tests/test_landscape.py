"""Santurkar et al.'s measurements (bnjax/training/landscape.py) on cases
whose answers are known in closed form, and noisy BN (bnjax/bn/noisy.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.bn.batchnorm import BatchNorm
from bnjax.bn.noisy import NoisyBatchNorm, santurkar_noisy_bn
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
    np.testing.assert_allclose(measured["grad_norm"], np.linalg.norm(a @ theta), rtol=1e-6)  # the slope, apart


def test_the_study_probes_the_papers_step_range():
    # Santurkar et al. move along the gradient by [1/2, 4] x the learning rate.
    from experiments import why_bn_works

    assert min(why_bn_works.STEP_SIZES) == 0.5 and max(why_bn_works.STEP_SIZES) == 4.0


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
    np.testing.assert_allclose(shift["Dense_1"]["relative"], np.linalg.norm(g - g_next) / np.linalg.norm(g), rtol=1e-4)
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


def test_algorithm_1_draws_each_feature_and_each_value_from_the_papers_distributions():
    # Santurkar et al.'s Algorithm 1 (n_mu 0.5, n_sigma 1.25, r_mu = r_sigma = 0.1): per feature and
    # step, shift ~ U(-0.5, 0.5) and scale ~ U(1, 1.25); per value, uniform within 0.1 of those.
    layer = santurkar_noisy_bn()
    key = jax.random.key_data(jax.random.key(3))
    shape = (64, 5, 5, 32)
    feature_shifts, feature_scales, spreads = [], [], []
    for step in range(40):
        shift, scale = layer.noise(key, step, shape)
        assert shift.shape == scale.shape == shape
        centre_shift = np.asarray(shift).reshape(-1, 32)
        centre_scale = np.asarray(scale).reshape(-1, 32)
        # each value within r of its feature's draw: the feature's draw is the middle of its values' range
        mid_shift = (centre_shift.max(0) + centre_shift.min(0)) / 2
        mid_scale = (centre_scale.max(0) + centre_scale.min(0)) / 2
        assert np.all(np.abs(centre_shift - mid_shift) <= 0.1 + 1e-6)
        assert np.all(np.abs(centre_scale - mid_scale) <= 0.1 + 1e-6)
        feature_shifts.append(mid_shift)
        feature_scales.append(mid_scale)
        spreads.append(centre_shift.std(0))
    feature_shifts, feature_scales = np.concatenate(feature_shifts), np.concatenate(feature_scales)
    # 1280 draws of each: within the ranges up to the jitter's own rounding, spread as U(a, b) spreads
    assert np.all(np.abs(feature_shifts) <= 0.5 + 2e-3) and np.all((feature_scales >= 1 - 2e-3)
                                                                    & (feature_scales <= 1.25 + 2e-3))
    assert abs(feature_shifts.std() - 1 / np.sqrt(3) * 0.5) < 0.02 and abs(feature_shifts.mean()) < 0.03
    assert abs(feature_scales.mean() - 1.125) < 0.01 and abs(feature_scales.std() - 0.25 / np.sqrt(12)) < 0.01
    assert abs(np.mean(spreads) - 0.1 / np.sqrt(3)) < 0.005  # U(-0.1, 0.1) per value


def test_algorithm_1_spares_the_logits_unless_asked_and_travels_in_a_config():
    from bnjax.nets.models import ConvNet

    images = jnp.ones((4, 28, 28, 1))
    stats = ConvNet(batch_norm=True, bn=santurkar_noisy_bn()).init(jax.random.key(0), images,
                                                                   train=False)["batch_stats"]
    assert sorted(stats) == ["BatchNorm_0", "NoisyBatchNorm_0", "NoisyBatchNorm_1", "NoisyBatchNorm_2",
                             "NoisyBatchNorm_3"] and "noise_key" not in stats["BatchNorm_0"]
    noisy_logits = ConvNet(batch_norm=True, bn=santurkar_noisy_bn(noise_logits=True)).init(
        jax.random.key(0), images, train=False)["batch_stats"]
    assert "noise_key" in noisy_logits["NoisyBatchNorm_4"]
    config = TrainConfig(batch_norm=True, bn=santurkar_noisy_bn())
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["bn"]["noise_scale_law"] == "uniform" and config.to_dict()["bn"]["noise_jitter"] == 0.1


def test_the_control_adds_the_same_noise_to_a_layer_that_does_not_normalize():
    # The paper's control: the noise on the plain net. normalize=False: y = scale * x + bias, then the
    # noise, drawn as noisy BN draws it; without_noise() leaves the affine layer (or BN) alone.
    x = jnp.asarray(RNG.normal(3.0, 2.0, size=(16, 6)), jnp.float32)
    control, noisy = santurkar_noisy_bn(normalize=False), santurkar_noisy_bn()
    variables = control.init(jax.random.key(0), x, use_running_average=False)
    params = {"scale": jnp.arange(1.0, 7.0), "bias": jnp.full((6,), 0.5)}
    variables = {**variables, "params": params}
    assert sorted(variables["batch_stats"]) == ["noise_key", "noise_step"]
    y, updates = control.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    shift, scale = control.noise(variables["batch_stats"]["noise_key"], 0, x.shape)
    np.testing.assert_allclose(y, (x * params["scale"] + 0.5) * scale + shift, rtol=1e-6)
    assert int(updates["batch_stats"]["noise_step"]) == 1
    np.testing.assert_array_equal(control.apply(variables, x, use_running_average=True), x * params["scale"] + 0.5)
    np.testing.assert_array_equal(control.without_noise().apply(variables, x, use_running_average=False,
                                                                 mutable=["batch_stats"])[0], x * params["scale"] + 0.5)
    # Noisy BN with its noise off is BN, exactly, whatever the draw.
    bn_variables = noisy.init(jax.random.key(1), x, use_running_average=False)
    clean = keras_bn().apply({"params": bn_variables["params"], "batch_stats": {
        k: bn_variables["batch_stats"][k] for k in ("mean", "var")}}, x, use_running_average=False,
        mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(noisy.without_noise().apply(bn_variables, x, use_running_average=False,
                                                              mutable=["batch_stats"])[0], clean)
    assert noisy.without_noise().for_output() == noisy.for_output()  # the logits' BN: plain BN either way
    assert isinstance(control.for_output(), NoisyBatchNorm) and control.for_output().noise_shift == 0.0


@pytest.mark.parametrize("settings, message", [
    (dict(noise_shift=-1.0), "noise_shift must be a non-negative number, got -1.0"),
    (dict(noise_log2_scale="big"), "noise_log2_scale must be a non-negative number, got 'big'"),
    (dict(noise_jitter=-0.1), "noise_jitter must be a non-negative number, got -0.1"),
    (dict(noise_scale_law="normal"), "unknown noise_scale_law 'normal'; allowed: log2_uniform, uniform"),
    (dict(noise_scale_max=0.5), r"noise_scale_max must be a number >= 1 \(scale ~ U\(1, noise_scale_max\)\), got 0.5"),
    (dict(noise_logits="no"), "noise_logits must be True or False, got 'no'"),
    (dict(normalize=0), "normalize must be True or False, got 0"),
    (dict(normalize=False, axis=1), r"normalize=False \(the noise on a plain net\) takes features on the last axis, "
                                    r"axis -1, got axis=1"),
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
