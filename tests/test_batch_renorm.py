"""Batch Renormalization (bnjax/bn/batchnorm.py::batch_renorm_train): equal to
Keras 3's `BatchNormalization(renorm=True)` on numbers exported once from it
(tests/fixtures/make_batch_renorm_fixtures.py), plus what Keras has no
counterpart for (the warm-up) and one-line errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.__main__ import config_from_settings
from bnjax.bn.batchnorm import BatchNorm, Renorm, clip_limits
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.steps import create_train_state, train_step, to_float_images
from tolerances import assert_within, bn_round_off, feature_scale

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "batch_renorm.npz")
MOMENTUM, RENORM_MOMENTUM, EPSILON, R_MAX, D_MAX = (float(value) for value in FIXTURE["settings"])
STEPS = len(FIXTURE["batches"])
# Keras (on JAX) and bnjax compute in float32 in their own order (Keras folds
# r and d into gamma and beta before normalizing; its variance is another
# reduction): each value within the BN layer's round-off (tests/tolerances.py),
# relative to its feature's largest value. The fixture's channels have
# mean^2 / var up to 43, so that relative bound is 3e-4 on the worst channel
# and 1e-5 on the best.


def feature_sum(values):
    return values.reshape(-1, values.shape[-1]).sum(axis=0)


def assert_keras(ours, theirs, relative, err_msg=""):
    assert_within(ours, theirs, relative * feature_scale(theirs), err_msg)


# bnjax's names for Keras's variables.
NAMES = {"moving_mean": "mean", "moving_variance": "var", "moving_stddev": "std", "renorm_mean": "renorm_mean",
         "renorm_stddev": "renorm_std"}


def renorm_layer():
    return BatchNorm(momentum=MOMENTUM, epsilon=EPSILON,
                     renorm=Renorm(r_max=R_MAX, d_max=D_MAX, momentum=RENORM_MOMENTUM))


def test_train_steps_gradients_and_eval_equal_keras():
    layer = renorm_layer()
    weights = jnp.asarray(FIXTURE["weights"])
    variables = layer.init(jax.random.key(0), jnp.asarray(FIXTURE["batches"][0]), use_running_average=True)
    params = {"scale": jnp.asarray(FIXTURE["gamma"]), "bias": jnp.asarray(FIXTURE["beta"])}
    batch_stats = variables["batch_stats"]

    def loss(params, x, batch_stats):
        y, updates = layer.apply({"params": params, "batch_stats": batch_stats}, x, use_running_average=False,
                                 mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, updates["batch_stats"])

    clipped_r = clipped_d = 0
    relative = 0.0  # the largest of the steps so far: the running statistics carry every step's round-off
    for step in range(STEPS):
        x = jnp.asarray(FIXTURE["batches"][step])
        relative = np.maximum(relative, bn_round_off(FIXTURE["batches"][step]))
        # How many channels' r and d are clipped at this step (the fixture must exercise the clipping).
        std = jnp.sqrt(x.reshape(-1, x.shape[-1]).var(0) + EPSILON)
        r = std / batch_stats["renorm_std"]
        clipped_r += int(jnp.sum((r > R_MAX) | (r < 1 / R_MAX)))
        d = (x.reshape(-1, x.shape[-1]).mean(0) - batch_stats["renorm_mean"]) / batch_stats["renorm_std"]
        clipped_d += int(jnp.sum(jnp.abs(d) > D_MAX))

        previous_batch_stats = batch_stats
        (_, (y, batch_stats)), (grad_params, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x, batch_stats)
        assert_keras(y, FIXTURE[f"train_output/{step}"], relative, "train output")
        assert_keras(grad_x, FIXTURE[f"grad_input/{step}"], relative, "input gradient")
        # gamma's and beta's gradients are sums over the batch that cancel: their
        # round-off scales with the sum of the terms' sizes, not with the result.
        normalized = (FIXTURE[f"train_output/{step}"] - FIXTURE["beta"]) / FIXTURE["gamma"]
        assert_within(grad_params["scale"], FIXTURE[f"grad_gamma/{step}"],
                      relative * feature_sum(np.abs(normalized * FIXTURE["weights"])), "gamma gradient")
        assert_within(grad_params["bias"], FIXTURE[f"grad_beta/{step}"],
                      relative * feature_sum(np.abs(FIXTURE["weights"])), "beta gradient")
        for keras_name, name in NAMES.items():
            assert_keras(batch_stats[name], FIXTURE[f"{keras_name}/{step}"], relative, keras_name)
        assert int(batch_stats["count"]) == step + 1
    assert 0 < clipped_r < STEPS * 4 and 0 < clipped_d < STEPS * 4

    eval_output = layer.apply({"params": params, "batch_stats": batch_stats}, jnp.asarray(FIXTURE["held_out"]),
                              use_running_average=True)
    assert_keras(eval_output, FIXTURE["eval_output"], relative, "eval output")
    # One update fewer moves the outputs far beyond the tolerance.
    wrong = layer.apply({"params": params, "batch_stats": previous_batch_stats}, jnp.asarray(FIXTURE["held_out"]),
                        use_running_average=True)
    assert np.any(np.abs(np.asarray(wrong) - FIXTURE["eval_output"]) > 10 * relative * feature_scale(FIXTURE["eval_output"]))


def test_gradient_is_stopped_through_r_and_d():
    # With r and d differentiated, the input gradient would differ from Keras's;
    # check the alternative really is another number (so the test above can fail).
    layer = renorm_layer()
    x, weights = jnp.asarray(FIXTURE["batches"][0]), jnp.asarray(FIXTURE["weights"])
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    params = {"scale": jnp.asarray(FIXTURE["gamma"]), "bias": jnp.asarray(FIXTURE["beta"])}

    def through_r_and_d(x):  # the same first step (renorm mean 0, std 1), r and d differentiated
        mean, var = x.reshape(-1, 4).mean(0), x.reshape(-1, 4).var(0)
        std = jnp.sqrt(var + EPSILON)
        r, d = jnp.clip(std, 1 / R_MAX, R_MAX), jnp.clip(mean, -D_MAX, D_MAX)
        return jnp.sum((((x - mean) / std * r + d) * params["scale"] + params["bias"]) * weights)

    relative = bn_round_off(FIXTURE["batches"][0])
    tolerance = relative * feature_scale(FIXTURE["grad_input/0"])
    unstopped = jax.grad(through_r_and_d)(x)
    assert np.any(np.abs(np.asarray(unstopped) - FIXTURE["grad_input/0"]) > 10 * tolerance)
    stopped = jax.grad(lambda x: jnp.sum(layer.apply({**variables, "params": params}, x, use_running_average=False,
                                                     mutable=["batch_stats"])[0] * weights))(x)
    assert_keras(stopped, FIXTURE["grad_input/0"], relative)


def test_warm_up_opens_the_clipping_linearly_from_plain_bn():
    renorm = Renorm(r_max=3.0, d_max=5.0, warmup_steps=4)
    limits = [tuple(float(v) for v in clip_limits(renorm, count)) for count in (1, 2, 3, 5, 50)]
    assert limits == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (3.0, 5.0), (3.0, 5.0)]
    # At the first update r = 1 and d = 0: the output is plain BN's.
    x = jnp.asarray(FIXTURE["batches"][0])
    warm = BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, renorm=renorm)
    variables = warm.init(jax.random.key(0), x, use_running_average=True)
    y_renorm = warm.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]
    y_plain = BatchNorm(momentum=MOMENTUM, epsilon=EPSILON).apply(
        {"params": variables["params"]}, x, use_running_average=False, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y_renorm, y_plain, rtol=1e-6, atol=1e-6)


def test_renorm_trains_the_article_net_and_keeps_eval_mode_unchanged(tiny_data):
    config = TrainConfig(batch_norm=True, bn=keras_bn(renorm=Renorm(warmup_steps=2)))
    state = create_train_state(config, jax.random.key(0))
    images, labels = to_float_images(jnp.asarray(tiny_data.x_train[:32])), jnp.asarray(tiny_data.y_train[:32])
    for _ in range(3):
        state, metrics = train_step(state, images, labels)
    assert np.isfinite(float(metrics["loss"]))
    stats = state.batch_stats["BatchNorm_0"]
    assert set(stats) == {"mean", "var", "std", "renorm_mean", "renorm_std", "count"} and int(stats["count"]) == 3
    np.testing.assert_allclose(stats["var"], np.maximum(np.square(stats["std"]) - config.bn_layer().epsilon, 0), rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    (["bn.renorm=true", "bn.renorm.r_max=0.5"],
     "bn.renorm: r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got 0.5"),
    (["bn.renorm=true", "bn.renorm.d_max=-1"],
     "bn.renorm: d_max must be a number >= 0 (d is clipped to [-d_max, d_max]), got -1.0"),
    (["bn.renorm=true", "bn.renorm.momentum=1"], "bn.renorm: momentum must be a number in [0, 1), got 1.0"),
    (["bn.renorm=true", "bn.renorm.warmup_steps=-3"],
     "bn.renorm: warmup_steps must be a non-negative integer, got -3"),
    (["bn.renorm=true", "bn.running_average=cumulative"],
     "bn: renorm keeps Keras's moving averages; use running_average 'ema' with it, not 'cumulative'"),
    (["bn.renorm=true", "bn.frozen=true"], "bn: frozen uses the running statistics, also in training: renorm does not apply"),
    (["bn.renorm.r_max=2"], "bn.renorm.r_max is a setting of Batch Renorm, which this run does not use; add --set bn.renorm=true"),
])
def test_bad_renorm_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as error:
        config_from_settings(["batch_norm=true", *settings])
    assert str(error.value) == message


def test_renorm_true_is_the_default_renorm_and_renorm_needs_bn():
    assert config_from_settings(["batch_norm=true", "bn.renorm=true"]).bn.renorm == Renorm()
    with pytest.raises(ValueError, match=r"^bn=BatchNorm\(epsilon=0.001, renorm=Renorm\(.*\)\) is a BN setting, and this "
                                         r"run has no BN \(batch_norm=False\)"):
        config_from_settings(["bn.renorm=true"])


def test_renorm_module_refuses_bad_limits_in_one_line():
    with pytest.raises(ValueError) as error:
        Renorm(r_max=0.9)
    assert str(error.value) == "r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got 0.9"
