"""bnjax.nnx.BatchNorm is a drop-in for flax.nnx.BatchNorm: held to flax's
own NNX layer (outputs, running statistics and gradients bit for bit, and a
model trained with each), its train/eval switching, and the variants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax.bn.batchnorm import Renorm
from bnjax.nets.nnx_model import NNXConvNet

X = 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) + 1.0
WEIGHTS = jax.random.normal(jax.random.key(1), X.shape)


def loss(layer, x, use_running_average):
    return jnp.sum(layer(x, use_running_average=use_running_average).astype(jnp.float32) * WEIGHTS)


@pytest.mark.parametrize("arguments", [
    dict(), dict(momentum=0.9, epsilon=1e-3), dict(use_bias=False), dict(use_scale=False),
    dict(use_fast_variance=False), dict(bias_init=nnx.initializers.normal(0.5), scale_init=nnx.initializers.uniform(2.0)),
    dict(dtype=jnp.bfloat16), dict(axis=1)],
    ids=["defaults", "keras-values", "no-bias", "no-scale", "two-pass", "random-inits", "bfloat16", "axis-1"])
def test_equals_flax_nnx(arguments):
    features = X.shape[arguments.get("axis", -1)]
    ours = bnjax.nnx.BatchNorm(features, rngs=nnx.Rngs(0), **arguments)
    theirs = nnx.BatchNorm(features, rngs=nnx.Rngs(0), **arguments)
    for use_running_average in (False, True, False):  # train, eval with the updated statistics, train again
        our_y, their_y = ours(X, use_running_average), theirs(X, use_running_average)
        assert our_y.dtype == their_y.dtype
        np.testing.assert_array_equal(our_y, their_y)
        np.testing.assert_array_equal(ours.mean[...], theirs.mean[...])
        np.testing.assert_array_equal(ours.var[...], theirs.var[...])
    # Gradients too: the same operations in the same order, backward as forward.
    our_grads = nnx.grad(loss)(ours, X, False)
    their_grads = nnx.grad(loss)(theirs, X, False)
    for name in ("scale", "bias"):
        if getattr(theirs, name) is not None:
            np.testing.assert_array_equal(getattr(our_grads, name)[...], getattr(their_grads, name)[...], name)


def test_train_eval_and_views_switch_it_as_flaxs():
    layer = bnjax.nnx.BatchNorm(6, rngs=nnx.Rngs(0))
    assert layer.use_running_average is False  # flax.nnx's default
    layer.eval()
    before = np.asarray(layer.mean[...])
    layer(X)
    np.testing.assert_array_equal(layer.mean[...], before)  # eval mode moves nothing
    layer.train()
    layer(X)
    assert not np.array_equal(layer.mean[...], before)  # train mode does, in place
    if hasattr(nnx, "view"):  # flax >= 0.12.4
        eval_view = nnx.view(layer, use_running_average=True)
        after = np.asarray(layer.mean[...])
        eval_view(X)
        np.testing.assert_array_equal(layer.mean[...], after)


@pytest.mark.parametrize("variant", [
    dict(running_average="debiased_ema"), dict(running_average="cumulative"), dict(unbiased_running_var=True),
    dict(renorm=Renorm(r_max=1.5, d_max=0.5)), dict(frozen=True), dict(ghost_batch_size=4)],
    ids=["debiased", "cumulative", "unbiased", "renorm", "frozen", "ghost"])
def test_variants_equal_the_linen_layer(variant):
    """Each variant computes what bnjax.BatchNorm (linen, held to Haiku, PyTorch,
    Keras and torchvision elsewhere) computes: the same outputs and statistics."""
    layer = bnjax.nnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0), **variant)
    linen = bnjax.BatchNorm(momentum=0.9, **variant)
    variables = linen.init(jax.random.key(0), X, use_running_average=True)
    for step in range(2):
        y = layer(X * (1 + step), use_running_average=False)
        linen_y, updates = linen.apply(variables, X * (1 + step), use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_array_equal(y, linen_y)
        for name, value in variables["batch_stats"].items():
            np.testing.assert_array_equal(getattr(layer, name)[...], value)


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^momentum must be a number in \[0, 1\]"):
        bnjax.nnx.BatchNorm(6, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^ghost_batch_size applies to plain BN only, not with frozen$"):
        bnjax.nnx.BatchNorm(6, frozen=True, ghost_batch_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^use_running_average must be given"):
        bnjax.nnx.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0))(X)


def test_bnjaxs_nnx_net_uses_it():
    model = NNXConvNet("relu", rngs=nnx.Rngs(0))
    assert all(type(norm) is bnjax.nnx.BatchNorm for norm in model.norms)


@pytest.mark.parametrize("case", ["mask", "float16", "complex"])
def test_masks_half_and_complex_inputs_equal_flax_nnx(case):
    x, call, arguments = X, {}, {}
    if case == "mask":
        call = {"mask": jax.random.bernoulli(jax.random.key(3), 0.7, X.shape[:-1] + (1,))}
    elif case == "float16":
        x, arguments = X.astype(jnp.float16), {"dtype": jnp.float16}
    else:  # flax.nnx keeps float32 running statistics: a complex batch mean loses its
        # imaginary part when written there, with JAX's warning, in both layers alike
        x = (X + 1j * jnp.flip(X, axis=0)).astype(jnp.complex64)
    ours = bnjax.nnx.BatchNorm(6, rngs=nnx.Rngs(0), **arguments)
    theirs = nnx.BatchNorm(6, rngs=nnx.Rngs(0), **arguments)
    for use_running_average in (False, True):
        our_y, their_y = ours(x, use_running_average, **call), theirs(x, use_running_average, **call)
        assert our_y.dtype == their_y.dtype
        np.testing.assert_array_equal(our_y, their_y)
        np.testing.assert_array_equal(ours.mean[...], theirs.mean[...])
        np.testing.assert_array_equal(ours.var[...], theirs.var[...])


class SmallCNN(nnx.Module):
    """A user's NNX model, its BN layer class given: a conv with its bias
    before BN (whose true gradient is 0), a dense layer, each followed by BN."""

    def __init__(self, norm, rngs: nnx.Rngs):
        self.conv = nnx.Conv(6, 8, (3, 3), rngs=rngs)
        self.norm1 = norm(8, momentum=0.9, rngs=rngs)
        self.dense = nnx.Linear(5 * 5 * 8, 16, rngs=rngs)
        self.norm2 = norm(16, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv(x)))
        return self.out(nnx.relu(self.norm2(self.dense(x.reshape(x.shape[0], -1)))))


@nnx.jit
def adam_step(model, optimizer, x, labels):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))


@pytest.mark.slow  # 2 x 300 steps
def test_trains_to_flax_nnxs_numbers_bit_for_bit():
    labels = jnp.arange(X.shape[0]) % 4
    states = {}
    for name, norm in (("flax", nnx.BatchNorm), ("bnjax", bnjax.nnx.BatchNorm)):
        model = SmallCNN(norm, nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        model.train()
        for step in range(300):
            adam_step(model, optimizer, X * (1 + 0.01 * (step % 7)), labels)
        states[name] = nnx.state(model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, states["bnjax"], states["flax"])
    assert float(jnp.abs(states["flax"]["norm1"]["mean"][...]).max()) > 1e-3  # the statistics moved
