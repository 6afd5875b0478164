"""The same BN net in Flax NNX gives the same logits and statistics as linen."""

import jax
import numpy as np
from flax import nnx

from bnjax.bn.batchnorm import BatchNorm
from bnjax.nets.models import ConvNet
from bnjax.nets.nnx_model import NNXConvNet, linen_to_nnx, mode_view, nnx_batch_stats, train_mode_forward
from tolerances import assert_within, network_round_off

IMAGES = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))


def assert_same(nnx_value, linen_value, relative: float):
    """Within the net's float32 round-off (tests/tolerances.py), relative to the largest linen value."""
    assert_within(nnx_value, linen_value, relative * np.abs(np.asarray(linen_value)).max())


def test_nnx_equals_linen_in_train_and_eval_mode():
    linen_model = ConvNet(batch_norm=True, activation="sigmoid", bn=BatchNorm(momentum=0.9, epsilon=1e-3))
    variables = linen_model.init(jax.random.key(1), IMAGES, train=False)
    # Give the running statistics values of their own before copying.
    _, updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    nnx_model = NNXConvNet("sigmoid", momentum=0.9, rngs=nnx.Rngs(0))
    linen_to_nnx(nnx_model, variables)

    relative = network_round_off(linen_model, variables, IMAGES)
    nnx_model.eval()
    assert_same(nnx_model(IMAGES), linen_model.apply(variables, IMAGES, train=False), relative)
    np.testing.assert_array_equal(nnx_batch_stats(nnx_model)["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])

    nnx_model.train()
    nnx_logits = nnx_model(IMAGES)  # updates nnx_model's BatchStat variables in place
    linen_logits, linen_updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    assert_same(nnx_logits, linen_logits, relative)
    for nnx_leaf, linen_leaf in zip(jax.tree_util.tree_leaves(nnx_batch_stats(nnx_model)),
                                    jax.tree_util.tree_leaves(linen_updates["batch_stats"])):
        assert_same(nnx_leaf, linen_leaf, relative)
    assert not np.allclose(nnx_batch_stats(nnx_model)["BatchNorm_4"]["var"], variables["batch_stats"]["BatchNorm_4"]["var"])


def test_views_and_a_jitted_split_merge_step_equal_linen():
    linen_model = ConvNet(batch_norm=True, activation="relu")
    variables = linen_model.init(jax.random.key(2), IMAGES, train=False)
    model = NNXConvNet("relu", rngs=nnx.Rngs(0))
    linen_to_nnx(model, variables)

    relative = network_round_off(linen_model, variables, IMAGES)
    eval_model = mode_view(model, train=False)
    assert_same(eval_model(IMAGES), linen_model.apply(variables, IMAGES, train=False), relative)

    graphdef, state = nnx.split(mode_view(model, train=True))
    logits, new_state = train_mode_forward(graphdef, state, IMAGES)
    nnx.update(model, new_state)
    linen_logits, linen_updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    # Compiled, XLA fuses the net otherwise than linen's eager apply: float32 round-off.
    assert_same(logits, linen_logits, relative)
    for nnx_leaf, linen_leaf in zip(jax.tree_util.tree_leaves(nnx_batch_stats(model)),
                                    jax.tree_util.tree_leaves(linen_updates["batch_stats"])):
        assert_same(nnx_leaf, linen_leaf, relative)
    assert not np.allclose(nnx_batch_stats(model)["BatchNorm_0"]["mean"], 0.0)
    # A wrong computation lies far outside the tolerance: flax's epsilon 1e-5 for Keras's 1e-3.
    flax_epsilon = NNXConvNet("relu", epsilon=1e-5, rngs=nnx.Rngs(0))
    linen_to_nnx(flax_epsilon, variables)
    wrong_logits, _ = train_mode_forward(*nnx.split(mode_view(flax_epsilon, train=True)), IMAGES)
    assert np.abs(np.asarray(wrong_logits) - np.asarray(linen_logits)).max() > 10 * relative * np.abs(linen_logits).max()
    # An eval view shares the model's variables: it now uses the updated statistics.
    updated = {"params": variables["params"], "batch_stats": linen_updates["batch_stats"]}
    assert_same(mode_view(model, train=False)(IMAGES), linen_model.apply(updated, IMAGES, train=False), relative)
    if hasattr(nnx, "view"):  # a view leaves the model's own mode as it was
        assert model.norms[0].use_running_average is not True
