"""The same BN net in Flax NNX gives the same logits and statistics as linen."""

import jax
import numpy as np
from flax import nnx

from bnjax.batchnorm import BatchNorm
from bnjax.models import ConvNet
from bnjax.nnx_model import NNXConvNet, linen_to_nnx, mode_view, nnx_batch_stats, train_mode_forward

IMAGES = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))


def test_nnx_equals_linen_in_train_and_eval_mode():
    linen_model = ConvNet(batch_norm=True, activation="sigmoid", bn=BatchNorm(momentum=0.9))
    variables = linen_model.init(jax.random.key(1), IMAGES, train=False)
    # Give the running statistics values of their own before copying.
    _, updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    nnx_model = NNXConvNet("sigmoid", momentum=0.9, rngs=nnx.Rngs(0))
    linen_to_nnx(nnx_model, variables)

    nnx_model.eval()
    np.testing.assert_allclose(nnx_model(IMAGES), linen_model.apply(variables, IMAGES, train=False), atol=1e-6)
    np.testing.assert_array_equal(nnx_batch_stats(nnx_model)["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])

    nnx_model.train()
    nnx_logits = nnx_model(IMAGES)  # updates nnx_model's BatchStat variables in place
    linen_logits, linen_updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(nnx_logits, linen_logits, atol=1e-6)
    for nnx_leaf, linen_leaf in zip(jax.tree_util.tree_leaves(nnx_batch_stats(nnx_model)),
                                    jax.tree_util.tree_leaves(linen_updates["batch_stats"])):
        np.testing.assert_allclose(nnx_leaf, linen_leaf, atol=1e-6)
    assert not np.allclose(nnx_batch_stats(nnx_model)["BatchNorm_4"]["var"], variables["batch_stats"]["BatchNorm_4"]["var"])


def test_views_and_a_jitted_split_merge_step_equal_linen():
    linen_model = ConvNet(batch_norm=True, activation="relu")
    variables = linen_model.init(jax.random.key(2), IMAGES, train=False)
    model = NNXConvNet("relu", rngs=nnx.Rngs(0))
    linen_to_nnx(model, variables)

    eval_model = mode_view(model, train=False)
    np.testing.assert_allclose(eval_model(IMAGES), linen_model.apply(variables, IMAGES, train=False), atol=1e-6)

    graphdef, state = nnx.split(mode_view(model, train=True))
    logits, new_state = train_mode_forward(graphdef, state, IMAGES)
    nnx.update(model, new_state)
    linen_logits, linen_updates = linen_model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    # Compiled, XLA fuses the net otherwise than linen's eager apply: float32
    # round-off (up to 5e-6 seen on logits of magnitude ~1).
    np.testing.assert_allclose(logits, linen_logits, atol=1e-5)
    for nnx_leaf, linen_leaf in zip(jax.tree_util.tree_leaves(nnx_batch_stats(model)),
                                    jax.tree_util.tree_leaves(linen_updates["batch_stats"])):
        np.testing.assert_allclose(nnx_leaf, linen_leaf, atol=1e-5)
    assert not np.allclose(nnx_batch_stats(model)["BatchNorm_0"]["mean"], 0.0)
    # An eval view shares the model's variables: it now uses the updated statistics.
    updated = {"params": variables["params"], "batch_stats": linen_updates["batch_stats"]}
    np.testing.assert_allclose(mode_view(model, train=False)(IMAGES), linen_model.apply(updated, IMAGES, train=False),
                               atol=1e-5)
    if hasattr(nnx, "view"):  # a view leaves the model's own mode as it was
        assert model.norms[0].use_running_average is not True
