"""bnjax.BatchNorm dropped into a ResNet in the style of flax/examples/imagenet
(experiments/bn_checkup.py): the model takes its norm as `partial(nn.BatchNorm, ...)`, and
`partial(bnjax.BatchNorm, ...)` replaces it with nothing else changed."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from experiments.bn_checkup import ResNet


IMAGES = jax.random.uniform(jax.random.key(0), (16, 32, 32, 3))
LABELS = jnp.arange(16) % 10


@functools.partial(jax.jit, static_argnums=(0, 2))
def train_step(model, variables, optimizer, optimizer_state):
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, IMAGES,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    changes, optimizer_state = optimizer.update(grads, optimizer_state)
    params = optax.apply_updates(variables["params"], changes)
    return {"params": params, "batch_stats": updates["batch_stats"]}, optimizer_state, logits

STEPS = 200


@pytest.mark.slow  # 2 x 200 steps of a ResNet
def test_bnjax_batchnorm_trains_a_resnet_to_flaxs_numbers_bit_for_bit():
    # As n2cholas/jax-resnet's users write it: the norm a partial with PyTorch's momentum.
    flax_model = ResNet(norm=functools.partial(nn.BatchNorm, momentum=0.9))
    bnjax_model = ResNet(norm=functools.partial(bnjax.BatchNorm, momentum=0.9))
    variables = flax_model.init(jax.random.key(1), IMAGES, train=False)
    ours = bnjax_model.init(jax.random.key(1), IMAGES, train=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, variables)  # the same variables, names and inits
    assert any(np.all(np.asarray(leaf) == 0) for leaf in jax.tree_util.tree_leaves(variables["params"]))

    optimizer = optax.sgd(0.1, momentum=0.9)
    runs = {}
    for name, model in (("flax", flax_model), ("bnjax", bnjax_model)):
        state, optimizer_state = variables, optimizer.init(variables["params"])
        for _ in range(STEPS):
            state, optimizer_state, logits = train_step(model, state, optimizer, optimizer_state)
        runs[name] = dict(state=state, logits=logits, eval_logits=model.apply(state, IMAGES, train=False))
    # The same operations in the same order, forward and backward: swapping
    # the import changes no number of the run, however long it trains.
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs["bnjax"], runs["flax"])
    # Training moved everything, so the comparison had something to catch.
    assert float(jnp.abs(runs["flax"]["state"]["batch_stats"]["bn_init"]["mean"]).max()) > 1e-3
    moved = jax.tree_util.tree_map(lambda new, old: float(jnp.abs(new - old).max()), runs["flax"]["state"]["params"],
                                   variables["params"])
    assert min(jax.tree_util.tree_leaves(moved)) > 0


# (PyTorch's unbiased running variance moves this net's statistics by 1 / 16383
# only: it is held to PyTorch in tests/test_convert.py and test_batchnorm.py.)
@pytest.mark.parametrize("variant", [
    dict(running_average="cumulative"), dict(renorm=bnjax.Renorm(r_max=1.5, d_max=0.5)), dict(frozen=True),
    dict(ghost_batch_size=4)], ids=["cumulative", "renorm", "frozen", "ghost"])
def test_each_variant_is_one_keyword_in_the_resnet(variant):
    plain = ResNet(norm=bnjax.BatchNorm)
    varied = ResNet(norm=functools.partial(bnjax.BatchNorm, **variant))
    variables = varied.init(jax.random.key(1), IMAGES, train=False)
    plain_variables = {"params": variables["params"],
                       "batch_stats": jax.tree_util.tree_map(lambda stats: {k: stats[k] for k in ("mean", "var")},
                                                             variables["batch_stats"],
                                                             is_leaf=lambda node: "mean" in node)}
    logits, updates = varied.apply(variables, IMAGES, mutable=["batch_stats"])
    plain_logits, plain_updates = plain.apply(plain_variables, IMAGES, mutable=["batch_stats"])
    moved = max(float(jnp.abs(logits - plain_logits).max()),
                float(jnp.abs(updates["batch_stats"]["bn_init"]["var"]
                              - plain_updates["batch_stats"]["bn_init"]["var"]).max()))
    assert moved > 1e-4, variant
