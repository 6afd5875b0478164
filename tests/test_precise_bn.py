"""Precise BN (bnjax/training/precise_bn.py): equal to PyTorch's `update_bn` on numbers
exported once from it (tests/fixtures/make_precise_bn_fixtures.py), both
variance conventions, and one-line errors."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from bnjax.bn.batchnorm import BatchNorm
from bnjax.nets import convert
from bnjax.nets.models import ConvNet
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.precise_bn import recompute_batch_stats
from bnjax.training.steps import TrainState
from bnjax.training.steps import create_train_state, to_float_images
from tolerances import assert_within, network_round_off

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "precise_bn.npz")
BN_LAYERS = [f"BatchNorm_{index}" for index in range(5)]  # bn1..bn5 of the PyTorch net, in call order
# PyTorch and bnjax both compute in float32, each in its own order (its
# convolutions, its in-place cumulative average): each statistic within the
# net's round-off (tests/tolerances.py) relative to the size of what it sums,
# |mean| + std for a mean, mean^2 + var for a variance.

def torch_net_state():
    """The exported PyTorch net as a bnjax TrainState mirroring PyTorch's BN
    conventions (eps 1e-5, unbiased running variance)."""
    state_dict = {key[len("state/"):]: FIXTURE[key] for key in FIXTURE.files if key.startswith("state/")}
    variables = convert.convnet_from_torch(state_dict, batch_norm=True)
    model = ConvNet(batch_norm=True, activation="relu", bn=convert.torch_batch_norm())
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.identity(),
                             batch_stats=variables["batch_stats"])


def torch_stat(layer_index: int, stat: str) -> np.ndarray:
    name = str(FIXTURE["bn_names"][layer_index])
    return FIXTURE[f"{stat}/{name}"]


@pytest.mark.slow
def test_batch_average_equals_torch_update_bn_and_pooled_equals_all_values_at_once():
    state = torch_net_state()
    batch, batches = int(FIXTURE["batch"]), len(FIXTURE["images"]) // int(FIXTURE["batch"])
    precise = recompute_batch_stats(state, FIXTURE["images"], batch_size=batch, num_batches=batches, seed=None)
    model = ConvNet(batch_norm=True, activation="relu", bn=convert.torch_batch_norm())
    relative = network_round_off(model, {"params": state.params, "batch_stats": state.batch_stats},
                                 to_float_images(FIXTURE["images"][:batch]))

    def assert_statistics(ours, mean, var, name, layer):
        size = np.abs(mean) + np.sqrt(var) if name == "mean" else np.square(mean) + var
        assert_within(ours, mean if name == "mean" else var, relative * size, f"{layer} {name}")

    for index, layer in enumerate(BN_LAYERS):
        mean = FIXTURE[f"after/{FIXTURE['bn_names'][index]}/running_mean"]
        var = FIXTURE[f"after/{FIXTURE['bn_names'][index]}/running_var"]
        for name in ("mean", "var"):
            assert_statistics(precise[layer][name], mean, var, name, layer)
    # "pooled": the variance of every value a BN saw in the pass, at once. The
    # net mirrors PyTorch's unbiased per-batch variances, so pooled is checked
    # on a net with Keras/Flax's biased ones (the same weights and batches).
    biased = state.replace(apply_fn=ConvNet(batch_norm=True, activation="relu", bn=BatchNorm(epsilon=1e-5)).apply)
    pooled = recompute_batch_stats(biased, FIXTURE["images"], batch_size=batch, num_batches=batches, seed=None,
                                   variance="pooled")
    for index, layer in enumerate(BN_LAYERS):
        mean = FIXTURE[f"after/{FIXTURE['bn_names'][index]}/running_mean"]  # the mean of the batch means: pooled
        assert_statistics(pooled[layer]["var"], mean, torch_stat(index, "pooled_var"), "var", layer)
    # The two conventions differ by the spread of the batch means, > 0 in every layer.
    averaged = recompute_batch_stats(biased, FIXTURE["images"], batch_size=batch, num_batches=batches, seed=None)
    for layer in BN_LAYERS:
        assert np.all(pooled[layer]["var"] >= averaged[layer]["var"]) and np.any(
            pooled[layer]["var"] > averaged[layer]["var"] + 1e-6), layer
    # ... and the pooled check fails on the batch-average convention (in the
    # deeper layers, where the batch means spread by more than round-off).
    with pytest.raises(AssertionError):
        for index, layer in enumerate(BN_LAYERS):
            assert_statistics(averaged[layer]["var"], FIXTURE[f"after/{FIXTURE['bn_names'][index]}/running_mean"],
                              torch_stat(index, "pooled_var"), "var", layer)
    # The state handed in is not changed.
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats, torch_net_state().batch_stats)


def test_bad_requests_name_the_value():
    images = np.zeros((64, 28, 28, 1), np.uint8)
    bn_state = create_train_state(TrainConfig(model="mlp", batch_norm=True), jax.random.key(0))
    with pytest.raises(ValueError, match="num_batches must be a positive integer, got 0"):
        recompute_batch_stats(bn_state, images, batch_size=8, num_batches=0)
    with pytest.raises(ValueError, match=r"num_batches 5 x batch_size 16 = 80 images; only 64 given"):
        recompute_batch_stats(bn_state, images, batch_size=16, num_batches=5)
    with pytest.raises(ValueError, match="unknown variance 'unbiased'; allowed: batch_average, pooled"):
        recompute_batch_stats(bn_state, images, batch_size=8, num_batches=2, variance="unbiased")
    plain_state = create_train_state(TrainConfig(model="mlp"), jax.random.key(0))
    with pytest.raises(ValueError, match="precise BN needs a model with BN; this state has no batch_stats"):
        recompute_batch_stats(plain_state, images, batch_size=8, num_batches=2)


def test_a_rule_s_update_count_is_kept():
    images = np.random.default_rng(0).integers(0, 256, size=(64, 28, 28, 1), dtype=np.uint8)
    state = create_train_state(TrainConfig(model="mlp", batch_norm=True, bn=keras_bn(running_average="cumulative")),
                               jax.random.key(0))
    precise = recompute_batch_stats(state, images, batch_size=16, num_batches=4)
    assert {int(layer["count"]) for layer in precise.values()} == {0}
    assert not np.allclose(precise["BatchNorm_0"]["mean"], state.batch_stats["BatchNorm_0"]["mean"])
