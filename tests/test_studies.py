"""The measuring code of the studies in experiments/: eval modes, precise BN,
the running averages' lag, the ablations' configs and bias gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.training import evaluation
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.precise_bn import precise_statistics
from bnjax.training.steps import create_train_state, make_model, to_float_images
from bnjax.training.train import train
from conftest import make_dataset
from experiments import ablations, eval_modes


@pytest.fixture(scope="module")
def trained(request):
    """A BN net trained for 20 steps on the synthetic data (not MNIST)."""
    data = make_dataset(num_train=640, num_test=64)
    config = TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=0.01, epochs=1, max_steps=20,
                         eval_every=20)
    _, state = train(config, data)
    return config, data, state


@jax.jit  # one program per batch shape, not one per operation (the eager forward pass took ~15 s)
def train_mode_logits(state, images_uint8):
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                               to_float_images(jnp.asarray(images_uint8)), train=True, mutable=["batch_stats"])
    return logits


@pytest.mark.slow
def test_batch_statistics_accuracy_normalizes_each_group_by_itself(trained):
    _, data, state = trained
    images, labels = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    for group_size in (64, 16):
        expected = np.concatenate([np.argmax(train_mode_logits(state, data.x_test[i:i + group_size]), -1)
                                   for i in range(0, 64, group_size)]) == data.y_test
        got = evaluation.batch_statistics_accuracy(state, images, labels, group_size)
        assert float(got) == pytest.approx(expected.mean())
    # A batch of one: the output BN subtracts the example's own value, so every
    # example gets the same logits (BN's bias): one class for all.
    logits = jax.vmap(lambda image: train_mode_logits(state, image[None])[0])(jnp.asarray(data.x_test))
    np.testing.assert_allclose(logits, np.broadcast_to(state.params["BatchNorm_4"]["bias"], logits.shape), atol=1e-5)
    majority = max(np.mean(data.y_test == c) for c in range(10))
    single = float(evaluation.batch_statistics_accuracy(state, images, labels, 1))
    assert single == pytest.approx(np.mean(data.y_test == int(np.argmax(logits[0]))))
    assert single <= majority
    with pytest.raises(ValueError, match=r"test batch size 65 must be in \[1, 64\], the test set's size"):
        evaluation.batch_statistics_accuracy(state, images, labels, 65)


def test_precise_statistics_are_the_mean_of_batch_statistics(trained):  # bnjax/training/precise_bn.py, on the article's CNN
    config, data, state = trained
    batches = to_float_images(jnp.asarray(data.x_train[:96])).reshape(3, 32, 28, 28, 1)
    precise = precise_statistics(make_model(config), state.params, state.batch_stats, batches)
    # By hand for the first BN: the first conv's output, per batch mean/variance over (N, H, W), averaged.
    kernel = state.params["Conv_0"]["kernel"]
    conv = jax.lax.conv_general_dilated(batches.reshape(96, 28, 28, 1), kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(3, 32, 26, 26, -1)
    np.testing.assert_allclose(precise["BatchNorm_0"]["mean"], conv.mean(axis=(1, 2, 3)).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(precise["BatchNorm_0"]["var"], conv.var(axis=(1, 2, 3)).mean(0), rtol=1e-3, atol=1e-7)
    # and precise BN never touches the state's own running averages
    assert not np.allclose(precise["BatchNorm_0"]["var"], state.batch_stats["BatchNorm_0"]["var"])


def test_lag_by_layer_is_zero_without_lag_and_measures_it_otherwise():
    stats = {"BatchNorm_0": {"mean": jnp.array([1.0, -2.0]), "var": jnp.array([4.0, 9.0])}}
    lag = eval_modes.lag_by_layer(stats, stats, epsilon=1e-3)
    assert lag == {"BatchNorm_0/mean_gap": 0.0, "BatchNorm_0/var_ratio": pytest.approx(1.0)}
    lagging = {"BatchNorm_0": {"mean": jnp.array([1.0 + 2.0, -2.0]), "var": jnp.array([4.0, 9.0]) * 4 + 3e-3}}
    lag = eval_modes.lag_by_layer(lagging, stats, epsilon=1e-3)
    assert lag["BatchNorm_0/mean_gap"] == pytest.approx((2.0 / np.sqrt(4.001)) / 2, rel=1e-5)  # one channel off by ~1 std
    assert lag["BatchNorm_0/var_ratio"] == pytest.approx(4.0, rel=1e-5)


@pytest.mark.slow
def test_eval_mode_probe_records_what_the_figures_read(trained):
    config, data, state = trained
    probe = eval_modes.EvalModeProbe(dataclasses.replace(config), data._replace(
        x_train=np.tile(data.x_train, (10, 1, 1, 1)), y_train=np.tile(data.y_train, 10)))  # >= 200 batches of 32
    record = probe(state)
    layers = [f"BatchNorm_{i}" for i in range(5)]
    assert set(record) == {"batch_accuracy", "precise_accuracy"} | {f"{layer}/{kind}" for layer in layers
                                                                    for kind in ("mean_gap", "var_ratio")}
    assert all(np.isfinite(value) for value in record.values())


@pytest.mark.slow
def test_momentum_changes_the_running_averages_only(tiny_data):
    """Train mode normalizes with batch statistics, so BN momentum cannot change
    the weights: the eval-modes study's momentum runs share their weights.
    (On the BN paper's MLP: the same BN layer, a fraction of the CNN's compile.)"""
    runs = {}
    for momentum in (0.9, 0.999):
        config = TrainConfig(model="mlp", batch_norm=True, bn=keras_bn(momentum=momentum), epochs=1, max_steps=8, batch_size=32)
        runs[momentum] = train(config, tiny_data)[1]
    for a, b in zip(jax.tree_util.tree_leaves(runs[0.9].params), jax.tree_util.tree_leaves(runs[0.999].params)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(runs[0.9].batch_stats["BatchNorm_0"]["mean"], runs[0.999].batch_stats["BatchNorm_0"]["mean"])


def test_ablation_configs_cover_their_grids():
    assert len(ablations.position_configs(3)) == 2 * 2 * 3
    after = [c for c in ablations.position_configs(1) if c.bn_position == "after"]
    assert all(c.bn_use_bias for c in after)
    grid = ablations.lr_grid_configs(1)
    assert len(grid) == len(ablations.LEARNING_RATES) * len(ablations.ACTIVATIONS) * 2
    assert {c.eval_every for c in grid} == {60000}  # evaluated once, at the end
    sizes = ablations.batch_size_configs(1, examples=60000)
    assert {c.batch_size * c.steps_per_epoch for c in sizes if c.batch_size <= 32} == {60000}
    assert all(c.steps_per_epoch == 60000 // c.batch_size for c in sizes)


@pytest.mark.slow
def test_bias_gradients_of_a_bias_before_bn_vanish(tiny_data):
    config = TrainConfig(batch_norm=True, bn_use_bias=True, epochs=1, max_steps=5)
    state = create_train_state(config, jax.random.key(0))
    measured = ablations.bias_gradients(config, state, tiny_data)
    # Float round-off only: the biases' gradients are ~1e-7 of the kernels' (1e-6 absolute at
    # init on these noise images, whose conv outputs are large; ~4e-8 on MNIST in the bias study).
    assert measured["bias_grad_max"] < 1e-5 * measured["kernel_grad_max"]
    assert measured["kernel_grad_max"] > 1e-3
    assert measured["bias_abs_max"] == 0.0  # biases start at zero
