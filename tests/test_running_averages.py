"""BN's running-statistics rules (bnjax/bn/batchnorm.py::running_average_weights)
and its one- or two-pass batch variance: from their equations, and equal to Haiku's debiased moving average and to
PyTorch's cumulative average on numbers exported once from those libraries
(tests/fixtures/make_running_average_fixtures.py)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.bn.batchnorm import BatchNorm, batch_statistics
from bnjax.engine.launch import train_many
from bnjax.engine.strategy import Strategy
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.train import train

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "running_averages.npz")
# Both references compute in float32 like bnjax, but in their own order
# (Haiku divides a zero-started average by 1 - decay^t; PyTorch updates its
# cumulative average in place): they agree to float32 round-off. Measured
# (dm-haiku 0.0.17, torch 2.13.0): running variances (values up to 12.9)
# within 3.8e-6 of Haiku's and 4.8e-6 of PyTorch's, means within 7.2e-7,
# eval-mode outputs within 4.8e-7.
RTOL, ATOL = 1e-5, 1e-5


def feed(module, batches, held_out):
    """Train-mode steps over `batches`; the running statistics after each, and
    the eval-mode output on `held_out` after the last."""
    variables = module.init(jax.random.key(0), jnp.asarray(batches[0]), use_running_average=True)
    means, variances = [], []
    for batch in batches:
        _, updates = module.apply(variables, jnp.asarray(batch), use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **updates}
        means.append(np.asarray(variables["batch_stats"]["mean"]))
        variances.append(np.asarray(variables["batch_stats"]["var"]))
    return np.stack(means), np.stack(variances), np.asarray(module.apply(variables, jnp.asarray(held_out),
                                                                          use_running_average=True)), variables


def batch_moments(batches, unbiased=False):
    means = batches.mean(axis=(1, 2, 3), dtype=np.float64)
    variances = batches.var(axis=(1, 2, 3), dtype=np.float64, ddof=1 if unbiased else 0)
    return means, variances


def test_debiased_ema_equals_haiku():
    momentum, epsilon = float(FIXTURE["momentum"]), float(FIXTURE["epsilon"])
    module = BatchNorm(momentum=momentum, epsilon=epsilon, running_average="debiased_ema")
    means, variances, eval_output, _ = feed(module, FIXTURE["batches"], FIXTURE["held_out"])
    np.testing.assert_allclose(means, FIXTURE["haiku_mean"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(variances, FIXTURE["haiku_var"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(eval_output, FIXTURE["haiku_eval"], rtol=RTOL, atol=ATOL)


def test_cumulative_average_equals_pytorch_momentum_none():
    epsilon = float(FIXTURE["epsilon"])
    module = BatchNorm(epsilon=epsilon, running_average="cumulative", unbiased_running_var=True)
    means, variances, eval_output, _ = feed(module, FIXTURE["batches"], FIXTURE["held_out"])
    np.testing.assert_allclose(means, FIXTURE["torch_mean"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(variances, FIXTURE["torch_var"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(eval_output, FIXTURE["torch_eval"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rule", ["ema", "debiased_ema", "cumulative"])
def test_each_rule_is_its_equation(rule):
    batches, momentum = FIXTURE["batches"], 0.9
    batch_means, batch_vars = batch_moments(batches)
    means, variances, _, variables = feed(BatchNorm(momentum=momentum, running_average=rule), batches,
                                          FIXTURE["held_out"])
    steps = len(batches)
    if rule == "ema":  # from mean 0 / var 1, each step keeps `momentum` of the old value
        weights = (1 - momentum) * momentum ** np.arange(steps - 1, -1, -1)
        expected_mean = weights @ batch_means
        expected_var = weights @ batch_vars + momentum**steps * 1.0
        assert "count" not in variables["batch_stats"]  # flax.linen.BatchNorm's variables, nothing more
    else:
        weights = (momentum ** np.arange(steps - 1, -1, -1) if rule == "debiased_ema" else np.ones(steps))
        weights = weights / weights.sum()  # the starting values get no weight
        expected_mean, expected_var = weights @ batch_means, weights @ batch_vars
        assert int(variables["batch_stats"]["count"]) == steps
    np.testing.assert_allclose(means[-1], expected_mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(variances[-1], expected_var, rtol=RTOL, atol=ATOL)
    if rule != "ema":  # the first update replaces the initial mean 0 / var 1 entirely
        np.testing.assert_allclose(means[0], batch_means[0], rtol=RTOL, atol=ATOL)


def test_eval_mode_reads_the_rule_s_average_and_moves_nothing():
    module = BatchNorm(running_average="cumulative")
    _, _, _, variables = feed(module, FIXTURE["batches"][:3], FIXTURE["held_out"])
    x = jnp.asarray(FIXTURE["held_out"])
    output, after = module.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["batch_stats"], variables["batch_stats"])
    stats = variables["batch_stats"]
    expected = (x - stats["mean"]) / jnp.sqrt(stats["var"] + module.epsilon)  # scale 1, bias 0 at init
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_unknown_rules_are_refused_in_one_line():
    with pytest.raises(ValueError, match="^bn: unknown running_average 'median'; allowed: cumulative, debiased_ema, ema$"):
        TrainConfig.from_dict({"batch_norm": True, "bn": {"running_average": "median"}})
    with pytest.raises(ValueError, match="unknown running_average 'EMA'; allowed: cumulative, debiased_ema, ema"):
        BatchNorm(running_average="EMA").init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=True)


@pytest.mark.slow
def test_a_rule_reaches_single_and_stacked_runs_through_the_loop(tiny_data):
    config = TrainConfig(model="mlp", batch_norm=True, activation="sigmoid", max_steps=7, eval_every=3,
                         bn=keras_bn(running_average="cumulative"))
    history, state = train(config, tiny_data)
    assert history.steps == [3, 6, 7]
    assert [int(layer["count"]) for layer in state.batch_stats.values()] == [7, 7, 7]
    stacked = train_many([dataclasses.replace(config, seed=seed) for seed in (0, 1)], tiny_data,
                         strategy=Strategy(models_per_program=2, steps_per_dispatch=3))
    np.testing.assert_allclose(stacked[0][0].val_loss, history.val_loss, rtol=1e-5, atol=1e-5)
    assert [int(layer["count"]) for layer in stacked[1][1].batch_stats.values()] == [7, 7, 7]
    default = train(dataclasses.replace(config, bn=None), tiny_data)
    assert default[0].val_loss != history.val_loss  # the rule changes what eval mode reads


def test_two_pass_variance_keeps_what_one_pass_loses():
    # Mean 1e4, std 1: E[x^2] ~ 1e8, where float32 values lie 8 apart, so
    # E[x^2] - E[x]^2 loses the variance; E[(x - E[x])^2] keeps it.
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(size=(64, 3))).astype(np.float32)
    exact = x.astype(np.float64).var(axis=0)
    _, one_pass = batch_statistics(jnp.asarray(x))
    mean, two_pass = batch_statistics(jnp.asarray(x), use_fast_variance=False)
    assert np.max(np.abs(np.asarray(one_pass) - exact)) > 0.5  # measured: 24, 8, 0 for 1.13, 0.74, 0.85
    np.testing.assert_allclose(two_pass, exact, rtol=1e-3)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    # On ordinary inputs the two agree to round-off, also across devices: a
    # vmapped axis stands for 4 devices of 16 examples each.
    y = rng.normal(2.0, 3.0, size=(4, 16, 5)).astype(np.float32)
    whole = np.asarray(batch_statistics(jnp.asarray(y.reshape(64, 5)), use_fast_variance=False)[1])
    sharded = jax.vmap(lambda shard: batch_statistics(shard, "devices", use_fast_variance=False)[1],
                       axis_name="devices")(jnp.asarray(y))
    np.testing.assert_allclose(sharded, np.broadcast_to(whole, (4, 5)), rtol=1e-5)
    np.testing.assert_allclose(whole, np.asarray(batch_statistics(jnp.asarray(y.reshape(64, 5)))[1]), rtol=1e-5)
    np.testing.assert_allclose(whole, y.reshape(64, 5).astype(np.float64).var(axis=0), rtol=1e-5)


def test_two_pass_variance_reaches_the_model_through_the_config(tiny_data):
    config = TrainConfig(model="mlp", batch_norm=True, max_steps=2, eval_every=2)
    one_pass = train(config, tiny_data)[1].batch_stats
    two_pass = train(dataclasses.replace(config, bn=keras_bn(use_fast_variance=False)), tiny_data)[1].batch_stats
    differences = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(one_pass),
                                                                 jax.tree_util.tree_leaves(two_pass))]
    assert max(differences) < 1e-4 and max(differences) > 0  # the same statistics, computed another way
    with pytest.raises(ValueError, match="^bn: use_fast_variance must be True or False, got 'yes'$"):
        TrainConfig.from_dict({"batch_norm": True, "bn": {"use_fast_variance": "yes"}})
