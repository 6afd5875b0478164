"""bnjax.update_bn and bnjax.nnx.update_bn: precise BN for any model, with
bnjax's or flax's BN layers, linen or NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax.nets.models import ConvNet
from bnjax.nets.nnx_model import NNXConvNet, linen_to_nnx
from bnjax.training.precise_bn import recompute_batch_stats
from bnjax.training.steps import TrainState, to_float_images
from conftest import make_dataset
from experiments.bn_checkup import ResNet
from tolerances import assert_within, sum_round_off

DATA = make_dataset(num_train=128)
BATCHES = [to_float_images(jnp.asarray(DATA.x_train[first:first + 32])) for first in range(0, 128, 32)]


def bnjax_net():
    model = ConvNet(batch_norm=True, activation="sigmoid")
    return model, model.init(jax.random.key(0), BATCHES[0][:1], train=False)


@pytest.mark.parametrize("variance", ["batch_average", "pooled"])
def test_equals_bnjaxs_precise_bn_on_its_net(variance):
    # recompute_batch_stats is held to PyTorch's update_bn (tests/test_precise_bn.py).
    model, variables = bnjax_net()
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.identity(),
                              batch_stats=variables["batch_stats"])
    expected = recompute_batch_stats(state, DATA.x_train, batch_size=32, num_batches=4, seed=None, variance=variance)
    found = bnjax.update_bn(model, variables, BATCHES, variance=variance, train=True)
    # The same batch statistics (bit for bit), averaged over the 4 batches in
    # another compiled program: within the round-off of those sums.
    for layer, stats in expected.items():
        size = np.abs(stats["mean"]) + np.sqrt(stats["var"])
        assert_within(found[layer]["mean"], stats["mean"], sum_round_off(len(BATCHES), size), layer)
        assert_within(found[layer]["var"], stats["var"], sum_round_off(len(BATCHES), np.square(size)), layer)
    other = recompute_batch_stats(state, DATA.x_train[32:], batch_size=32, num_batches=3, seed=None, variance=variance)
    with pytest.raises(AssertionError):  # other batches' statistics fail it
        assert_within(found["BatchNorm_0"]["mean"], other["BatchNorm_0"]["mean"],
                      sum_round_off(len(BATCHES), np.abs(other["BatchNorm_0"]["mean"]) + 1))


class FlaxMLP(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, inputs, train: bool):
        x = inputs["image"].reshape(inputs["image"].shape[0], -1)  # a pytree batch
        x = nn.relu(self.norm(use_running_average=not train)(nn.Dense(16, use_bias=False)(x)))
        return self.norm(use_running_average=not train, axis=-1)(nn.Dense(10, use_bias=False)(x))


@pytest.mark.parametrize("norm", [nn.BatchNorm, bnjax.BatchNorm], ids=["flax", "bnjax"])
def test_equals_statistics_computed_by_hand_layer_by_layer(norm):
    model = FlaxMLP(norm)
    batches = [{"image": batch} for batch in BATCHES]
    variables = model.init(jax.random.key(1), batches[0], train=False)
    found = bnjax.update_bn(model, variables, batches, train=True)
    kernels = [np.asarray(variables["params"][f"Dense_{i}"]["kernel"], np.float64) for i in range(2)]
    means, variances = {0: [], 1: []}, {0: [], 1: []}
    for batch in BATCHES:  # by hand in float64: each layer normalized by its batch's statistics, as in training
        h = np.asarray(batch, np.float64).reshape(32, -1) @ kernels[0]
        means[0].append(h.mean(0)), variances[0].append(h.var(0))
        a = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5), 0)
        h2 = a @ kernels[1]
        means[1].append(h2.mean(0)), variances[1].append(h2.var(0))
    for layer in (0, 1):
        stats = found[f"{norm.__name__}_{layer}"]
        mean, var = np.mean(means[layer], 0), np.mean(variances[layer], 0)
        # float32 against float64: sums of 784 and 16 products, then of 32 values (tests/tolerances.py).
        size = np.abs(mean) + np.sqrt(var)
        assert_within(stats["mean"], mean, sum_round_off(784 * 32, size) * (1 + layer))
        assert_within(stats["var"], var, sum_round_off(784 * 32, np.square(size)) * 4 * (1 + layer))
        assert not np.allclose(stats["mean"], variables["batch_stats"][f"{norm.__name__}_{layer}"]["mean"])


def test_a_resnet_with_flaxs_bn_every_layer_nested_and_under_jit():
    model = ResNet(norm=nn.BatchNorm)
    images = jax.random.uniform(jax.random.key(2), (3, 8, 32, 32, 3))
    variables = model.init(jax.random.key(1), images[0], train=False)
    found = bnjax.update_bn(model, variables, list(images), train=True)
    layers = [path for path, _ in jax.tree_util.tree_flatten_with_path(found)[0] if path[-1].key == "mean"]
    assert len(layers) == 6  # every BN layer, those inside the residual blocks too
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(found)[0],
                                jax.tree_util.tree_leaves(variables["batch_stats"])):
        assert not np.allclose(new, old), path
    jitted = jax.jit(lambda variables, images: bnjax.update_bn(model, variables, list(images), train=True))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jitted(variables, images), found)


def test_nnx_update_bn_equals_linen_and_writes_in_place():
    model, variables = bnjax_net()
    nnx_model = NNXConvNet("sigmoid", rngs=nnx.Rngs(0))
    linen_to_nnx(nnx_model, variables)
    expected = bnjax.update_bn(model, variables, BATCHES, train=True)
    returned = bnjax.nnx.update_bn(nnx_model, BATCHES)
    for index, norm in enumerate(nnx_model.norms):
        for name in ("mean", "var"):
            np.testing.assert_array_equal(getattr(norm, name)[...], expected[f"BatchNorm_{index}"][name])
            np.testing.assert_array_equal(returned[("norms", index)][name], expected[f"BatchNorm_{index}"][name])
        assert norm.momentum == 0.99 and norm.use_running_average is False  # the model's settings are kept


def test_nnx_update_bn_with_flaxs_own_layers():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(784, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.linear(x.reshape(x.shape[0], -1)))

    net = Net(nnx.Rngs(0))
    bnjax.nnx.update_bn(net, BATCHES)
    by_hand = [np.asarray(net.linear(batch.reshape(32, -1))) for batch in BATCHES]
    mean = np.mean([h.mean(0) for h in by_hand], 0)
    assert_within(net.norm.mean[...], mean, sum_round_off(32 * 784, np.abs(mean) + 1))


def test_bad_requests_are_refused_in_one_line():
    model, variables = bnjax_net()
    with pytest.raises(ValueError, match="^unknown variance 'unbiased'; allowed: batch_average, pooled$"):
        bnjax.update_bn(model, variables, BATCHES, variance="unbiased", train=True)
    with pytest.raises(ValueError, match="^update_bn found no batches to average"):
        bnjax.update_bn(model, variables, [], train=True)
    with pytest.raises(ValueError, match="^update_bn needs a model with BN layers"):
        bnjax.update_bn(model, {"params": variables["params"]}, BATCHES, train=True)


class EvalByDefault(nn.Module):
    """A user's model whose call defaults to eval mode, as many do."""
    norm: type = bnjax.BatchNorm

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x = nn.relu(self.norm(use_running_average=not train)(nn.Dense(16, use_bias=False)(inputs.reshape(
            len(inputs), -1))))
        return self.norm(use_running_average=not train)(nn.Dense(10, use_bias=False)(x))


@pytest.mark.parametrize("norm", [bnjax.BatchNorm, nn.BatchNorm], ids=["bnjax", "flax"])
def test_a_model_left_in_eval_mode_is_refused_not_silently_wrong(norm):
    model = EvalByDefault(norm)
    variables = model.init(jax.random.key(0), BATCHES[0])
    message = (r"^update_bn runs the model in train mode, but its BN layer BatchNorm_0 ran in eval mode "
               r"\(use_running_average=True\): pass the model's train-mode argument")
    with pytest.raises(ValueError, match=message):
        bnjax.update_bn(model, variables, BATCHES)
    with pytest.raises(ValueError, match=message):
        bnjax.checkup(model, variables, BATCHES, [(BATCHES[0], DATA.y_train[:32])], bnjax.accuracy,
                      train_kwargs={"train": False})
    found = bnjax.update_bn(model, variables, BATCHES, train=True)  # the call the front door's docstring shows
    assert float(jnp.abs(found["BatchNorm_1"]["mean"] - variables["batch_stats"]["BatchNorm_1"]["mean"]).max()) > 0


def test_a_frozen_layer_in_train_mode_is_no_error():
    model = EvalByDefault(lambda **settings: bnjax.BatchNorm(frozen=True, **settings))
    variables = model.init(jax.random.key(0), BATCHES[0])
    assert set(bnjax.update_bn(model, variables, BATCHES, train=True)) == {"BatchNorm_0", "BatchNorm_1"}


@pytest.mark.parametrize("norm", [bnjax.nnx.BatchNorm, nnx.BatchNorm], ids=["bnjax", "flax"])
def test_nnx_a_model_calling_its_bn_in_eval_mode_is_refused_not_silently_wrong(norm):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(784, 8, rngs=rngs)
            self.norm = norm(8, rngs=rngs)

        def __call__(self, x, train: bool = False):
            return self.norm(self.linear(x.reshape(x.shape[0], -1)), use_running_average=not train)

    net = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^update_bn runs the model in train mode, but its BN layer norm kept its "
                                         r"running statistics \(it ran in eval mode"):
        bnjax.nnx.update_bn(net, BATCHES)
    np.testing.assert_array_equal(net.norm.var[...], 1.0)  # nothing written
    bnjax.nnx.update_bn(net, BATCHES, train=True)  # the right call
    assert float(jnp.abs(net.norm.var[...] - 1.0).max()) > 0
