"""Ghost batches inside a device (`BatchNorm(ghost_batch_size=...)`,
`TrainConfig(bn=keras_bn(ghost_batch_size=...))`): each group of consecutive examples is
normalized as a BN over that group alone would normalize it, and the running
averages take the mean of the groups' statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.bn.batchnorm import BatchNorm, Renorm
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.precise_bn import recompute_batch_stats
from bnjax.training.steps import create_train_state
from bnjax.training.train import train
from bnjax.__main__ import config_from_settings
from conftest import make_dataset
from tolerances import assert_within, mean_round_off, normalized_round_off, variance_round_off

X = jax.random.normal(jax.random.key(1), (16, 5, 5, 3)) * 2.0 + 0.5


def apply_train(module, x, variables=None):
    variables = variables or module.init(jax.random.key(0), x, use_running_average=True)
    variables = {"params": {"scale": jnp.arange(1.0, 4.0), "bias": jnp.asarray([0.1, -0.2, 0.3])},
                 "batch_stats": variables["batch_stats"]}
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return y, updates["batch_stats"], variables


def test_each_group_is_normalized_by_its_own_statistics():
    y, stats, _ = apply_train(BatchNorm(momentum=0.9, epsilon=1e-3, ghost_batch_size=4), X)
    groups = [X[first:first + 4] for first in range(0, 16, 4)]
    per_group = [apply_train(BatchNorm(momentum=0.9, epsilon=1e-3), group) for group in groups]
    # The same statistics summed in another order: float32 round-off of each
    # group's (tests/tolerances.py), times the scale for the outputs and the
    # update's weight 0.1 for the running statistics.
    scale = np.arange(1.0, 4.0)
    output_tolerance = np.concatenate([normalized_round_off(group, 1e-3) * scale for group in groups])
    assert_within(y, jnp.concatenate([group_y for group_y, _, _ in per_group]), output_tolerance)
    # The running update is linear in the batch statistics: the mean of the groups' updates.
    round_off = {"mean": mean_round_off, "var": variance_round_off}
    for name in ("mean", "var"):
        tolerance = 0.1 * np.max([round_off[name](group) for group in groups], axis=0)
        assert_within(stats[name], np.mean([group_stats[name] for _, group_stats, _ in per_group], 0), tolerance)
    whole_y, whole_stats, _ = apply_train(BatchNorm(momentum=0.9), X)
    assert float(jnp.abs(y - whole_y).max()) > 0.05  # not the whole batch's normalization
    assert float(jnp.abs(stats["var"] - whole_stats["var"]).max()) > 1e-3  # group variances are smaller


def test_gradients_flow_within_each_group_only():
    def loss(x, ghost):
        y, _, _ = apply_train(BatchNorm(ghost_batch_size=ghost), x)
        return jnp.sum(jnp.sin(y[:4]))  # depends on the first group's outputs only

    grads = jax.grad(loss)(X, 4)
    assert float(jnp.abs(grads[4:]).max()) == 0.0  # other groups' examples do not enter the first group's BN
    assert float(jnp.abs(grads[:4]).max()) > 0.0
    assert float(jnp.abs(jax.grad(loss)(X, None)[4:]).max()) > 0.0  # whole-batch BN: they do


def test_one_group_of_the_whole_batch_is_plain_bn():
    y, stats, _ = apply_train(BatchNorm(ghost_batch_size=16), X)
    plain_y, plain_stats, _ = apply_train(BatchNorm(), X)
    np.testing.assert_allclose(y, plain_y, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name], plain_stats[name], rtol=1e-6, atol=1e-7)


def test_eval_mode_ignores_ghost_batches():
    _, _, variables = apply_train(BatchNorm(ghost_batch_size=4), X)
    np.testing.assert_array_equal(BatchNorm(ghost_batch_size=4).apply(variables, X, use_running_average=True),
                                  BatchNorm().apply(variables, X, use_running_average=True))


@pytest.mark.parametrize("size, message", [
    (5, "ghost_batch_size must be a positive integer that divides the batch of 16 examples, got 5"),
    (0, "ghost_batch_size must be None or a positive integer, got 0"),  # refused when the layer is made
])
def test_a_size_that_does_not_divide_the_batch_is_refused(size, message):
    with pytest.raises(ValueError) as error:
        apply_train(BatchNorm(ghost_batch_size=size), X)
    assert str(error.value) == message


def test_variants_that_do_not_take_ghost_batches_are_refused():
    with pytest.raises(ValueError, match="^ghost_batch_size applies to plain BN only, not with renorm$"):
        apply_train(BatchNorm(ghost_batch_size=4, renorm=Renorm()), X)


@pytest.mark.parametrize("settings, fields, message", [
    (dict(ghost_batch_size=5), {}, "bn.ghost_batch_size 5 must divide batch_size 32"),
    (dict(ghost_batch_size=16), dict(eval_statistics="batch", eval_batch_size=1000),
     "bn.ghost_batch_size 16 must divide eval_batch_size 1000 (eval_statistics 'batch' evaluates test batches in "
     "train mode)"),
    (dict(ghost_batch_size=8), dict(model="lstm", activation="tanh"),
     "the BN-LSTM's per-step BN takes ghost_batch_size=None only, got 8"),
])
def test_config_refuses_bad_ghost_batch_sizes_in_one_line(settings, fields, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(batch_norm=True, bn=keras_bn(**settings), **fields)
    assert str(error.value) == message


@pytest.mark.parametrize("value, message", [
    ("0", "bn: ghost_batch_size must be None or a positive integer, got 0"),
    ("x", "bn.ghost_batch_size must be an integer or none, got 'x'"),
])
def test_the_command_line_refuses_bad_ghost_batch_sizes_in_one_line(value, message):
    with pytest.raises(ValueError) as error:
        config_from_settings(["batch_norm=true", f"bn.ghost_batch_size={value}"])
    assert str(error.value) == message


@pytest.mark.slow
def test_ghost_batches_reach_a_run_through_the_loop():
    data = make_dataset(num_train=256, num_test=64)
    base = TrainConfig(batch_norm=True, model="mlp", batch_size=16, max_steps=6, eval_every=3, eval_batch_size=16,
                       eval_statistics="batch")
    plain = train(base, data)[0]
    whole = train(dataclasses.replace(base, bn=keras_bn(ghost_batch_size=16)), data)[0]
    ghost = train(dataclasses.replace(base, bn=keras_bn(ghost_batch_size=4)), data)[0]
    # One ghost batch of the whole batch (training and evaluation batches of
    # 16, evaluated with their own statistics) is plain BN computed in another order:
    # float32 round-off, grown by 6 training steps to at most 7e-8 relative on
    # losses ~0.7 (measured on AVX-512, AVX2 and SSE 4.2 code paths, jax 0.7.1
    # and 0.10.2), against 1e-3 and more for ghost batches of 4 (below).
    # Accuracies are not compared: an image whose two top logits lie within
    # round-off of each other may flip, so equal computations can differ by
    # whole images; the losses of the same evaluations are compared instead.
    np.testing.assert_allclose(whole.train_loss, plain.train_loss, rtol=1e-5)
    np.testing.assert_allclose(whole.batch_val_loss, plain.batch_val_loss, rtol=1e-5)
    assert np.abs(np.array(ghost.train_loss) - np.array(plain.train_loss)).max() > 1e-3


def test_precise_bn_estimates_whole_batches_whatever_the_ghost_batch_size():
    data = make_dataset(num_train=256, num_test=64)
    config = TrainConfig(batch_norm=True, model="mlp", batch_size=16)
    state = create_train_state(config, jax.random.key(0))
    ghost_state = create_train_state(dataclasses.replace(config, bn=keras_bn(ghost_batch_size=4)), jax.random.key(0))
    precise = recompute_batch_stats(state, data.x_train, batch_size=16, num_batches=8)
    ghost_precise = recompute_batch_stats(ghost_state, data.x_train, batch_size=16, num_batches=8)
    for a, b in zip(jax.tree_util.tree_leaves(precise), jax.tree_util.tree_leaves(ghost_precise)):
        np.testing.assert_array_equal(a, b)
