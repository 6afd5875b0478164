"""l_p normalization (bnjax/bn/lp_norm.py), Santurkar et al.'s alternatives to
BN: held to its closed form in float64 for p = 1, 2, inf; its running
averages and eval mode; the moments it leaves free; refusals; the article's
net trained with it from a TrainConfig."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.bn.batchnorm import keras_bn
from bnjax.bn.lp_norm import LpBatchNorm
from bnjax.training.config import TrainConfig
from tolerances import assert_within, bn_round_off

X = 1.5 * jax.random.normal(jax.random.key(0), (16, 3, 3, 4)) + jnp.array([0.0, 1.0, -2.0, 4.0])


def closed_form(x, p, epsilon, reduction_axes=(0, 1, 2)):
    """y and s^2 of the module doc, in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=reduction_axes, keepdims=True)
    if p == math.inf:
        s = np.abs(x).max(axis=reduction_axes, keepdims=True)
    else:
        s = (np.abs(x) ** p).mean(axis=reduction_axes, keepdims=True) ** (1 / p)
    return (x - mean) / np.sqrt(s ** 2 + epsilon), (s ** 2).squeeze()


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_train_mode_is_the_closed_form_and_the_running_averages_track_it(p):
    layer = LpBatchNorm(p=p, momentum=0.9, epsilon=1e-3)
    variables = layer.init(jax.random.key(1), X, use_running_average=True)
    y, updates = layer.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    expected, s_squared = closed_form(X, p, 1e-3)
    # float32 sums of 144 values per feature (tests/tolerances.py), against float64
    assert_within(y, expected, 4 * bn_round_off(np.asarray(X).reshape(-1, 4)) * np.abs(expected).max())
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * np.asarray(X, np.float64).mean((0, 1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * s_squared, rtol=1e-5)
    # Eval mode normalizes with the running averages, as BN does.
    eval_y = layer.apply({**variables, "batch_stats": stats}, X, use_running_average=True)
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(eval_y, (x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-3),
                               rtol=1e-5, atol=1e-5)


def test_it_centres_each_feature_but_leaves_its_variance_free():
    y, _ = LpBatchNorm(p=2).apply(LpBatchNorm(p=2).init(jax.random.key(1), X, use_running_average=True), X,
                                  use_running_average=False, mutable=["batch_stats"])
    bn_y, _ = bnjax.BatchNorm().apply(bnjax.BatchNorm().init(jax.random.key(1), X, use_running_average=True), X,
                                      use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn_y).var((0, 1, 2)), 1.0, rtol=1e-3)  # BN fixes it ...
    variances = np.asarray(y).var((0, 1, 2))  # ... l2 gives var / (var + mean^2): feature 3's mean 4 against std 1.5
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(variances, x.var((0, 1, 2)) / (x.var((0, 1, 2)) + x.mean((0, 1, 2)) ** 2), rtol=1e-3)
    assert variances[3] < 0.2


@pytest.mark.parametrize("settings, message", [
    (dict(p=3), r"^p must be 1, 2 or math.inf"),
    (dict(p=True), r"^p must be 1, 2 or math.inf"),
    (dict(renorm=bnjax.Renorm()), r"^renorm is defined on the standard deviation"),
    (dict(unbiased_running_var=True), r"^unbiased_running_var is defined on the standard deviation"),
])
def test_bad_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message):
        LpBatchNorm(**settings)


def test_ghost_batches_and_masks_take_it_too():
    layer = LpBatchNorm(p=1, ghost_batch_size=8)
    variables = layer.init(jax.random.key(1), X, use_running_average=True)
    y, _ = layer.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    for group in (slice(0, 8), slice(8, 16)):
        assert_within(y[group], closed_form(X[group], 1, 1e-5)[0], 1e-5)
    mask = jnp.arange(16)[:, None, None, None] < 12
    y, _ = LpBatchNorm(p=math.inf).apply(variables, X, use_running_average=False, mask=mask, mutable=["batch_stats"])
    expected, _ = closed_form(X[:12], math.inf, 1e-5)
    assert_within(y[:12], expected, 1e-5)


@pytest.mark.slow
def test_the_articles_net_trains_with_it_from_a_config(tiny_data):
    config = TrainConfig(batch_norm=True, bn=keras_bn(LpBatchNorm, p=1), max_steps=8, eval_every=4)
    assert TrainConfig.from_dict(config.to_dict()) == config and config.to_dict()["bn"]["p"] == 1
    history, state = bnjax.train(config, tiny_data)
    bn_history, _ = bnjax.train(TrainConfig(batch_norm=True, max_steps=8, eval_every=4), tiny_data)
    assert np.all(np.isfinite(history.train_loss)) and history.train_loss != bn_history.train_loss
    assert int(state.step) == 8


def test_l_infinity_travels_through_the_saved_form_and_the_command_line():
    import json

    from bnjax.__main__ import config_from_settings

    config = config_from_settings(["batch_norm=true", "bn.layer=LpBatchNorm", "bn.p=inf"])
    assert config.bn == keras_bn(LpBatchNorm, p=math.inf)
    saved = json.loads(json.dumps(config.to_dict(), allow_nan=False))  # standard JSON: "inf", not Infinity
    assert saved["bn"]["p"] == "inf" and TrainConfig.from_dict(saved) == config
