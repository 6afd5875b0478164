"""Config validation, the train and eval steps, and the training loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax.engine.launch import train_many
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.history import DIVERGED_LOSS, has_diverged
from bnjax.training.schedule import resolve_steps
from bnjax.training.steps import create_train_state, eval_step, train_step
from bnjax.training.train import train

BAD_VALUES = [
    ("learning_rate", 0.0, "learning_rate must be a positive finite number, got 0.0"),
    ("learning_rate", -0.01, "got -0.01"),
    ("learning_rate", float("nan"), "got nan"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", 32.5, "got 32.5"),
    ("epochs", -1, "epochs must be a positive integer, got -1"),
    ("optimizer", "adamw2", "unknown optimizer 'adamw2'; allowed: adam, rmsprop, sgd"),
    ("activation", "swish!", "unknown activation 'swish!'; allowed: elu, gelu, relu, sigmoid, tanh"),
    ("kernel_init", "he", "unknown kernel_init 'he'; allowed: glorot_uniform, lecun_normal"),
    ("bn", 0.99, "bn must be None or a bnjax.BatchNorm\\(...\\) of BN's settings, got 0.99"),
    ("eval_every", 0, "eval_every must be a positive integer, got 0"),
    ("max_steps", 0, "max_steps must be a positive integer or None, got 0"),
    ("steps_per_epoch", -5, "steps_per_epoch must be a positive integer or None, got -5"),
    ("seed", -1, "seed must be a non-negative integer, got -1"),
    ("seed", 2**32, "seed must be an integer from 0 to 4294967295 .*, got 4294967296"),
    ("seed", 2**63, "seed must be an integer from 0 to 4294967295 .*, got 9223372036854775808"),
    ("batch_norm", "yes", "batch_norm must be True or False, got 'yes'"),
    ("shuffle", 1, "shuffle must be True or False, got 1"),
    ("num_devices", 0, "num_devices must be a positive integer or None, got 0"),
    ("ghost_bn", "yes", "ghost_bn must be True or False, got 'yes'"),
    ("model", "resnet", "unknown model 'resnet'; allowed: convnet, lstm, mlp"),
    ("bn_position", "middle", "unknown bn_position 'middle'; allowed: after, before"),
    ("bn_use_bias", "no", "bn_use_bias must be True or False, got 'no'"),
]


def test_ablation_fields_are_for_the_convnet_only():
    with pytest.raises(ValueError, match="bn_position and bn_use_bias apply to model 'convnet' only, not 'mlp'"):
        TrainConfig(model="mlp", batch_norm=True, bn_position="after")


@pytest.mark.parametrize("field, value, message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_config_value_raises_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_defaults_are_the_article_recipe():
    config = TrainConfig()
    assert (config.optimizer, config.learning_rate, config.batch_size, config.epochs) == ("adam", 0.001, 32, 3)
    bn = config.bn_layer()
    assert (config.shuffle, config.kernel_init, bn.momentum, bn.epsilon) == (False, "glorot_uniform", 0.99, 1e-3)
    assert resolve_steps(config, 60000) == (1875, 5625)


def test_steps_per_epoch_beyond_the_data_is_an_error():
    with pytest.raises(ValueError, match="steps_per_epoch 2000 needs 64000 examples"):
        resolve_steps(TrainConfig(steps_per_epoch=2000), 60000)


def batch(data, size=32):
    return jnp.asarray(data.x_train[:size], jnp.float32) / 255.0, jnp.asarray(data.y_train[:size])


def test_train_step_updates_running_stats_by_the_formula(tiny_data):
    config = TrainConfig(batch_norm=True, bn=keras_bn(momentum=0.9))
    state = create_train_state(config, jax.random.key(0))
    images, labels = batch(tiny_data)
    new_state, metrics = train_step(state, images, labels)
    # The first BN sees Conv_0's output; recompute its batch mean by hand.
    conv_out = jax.lax.conv_general_dilated(images, state.params["Conv_0"]["kernel"], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    batch_mean = np.asarray(conv_out).mean(axis=(0, 1, 2))
    old_mean = np.asarray(state.batch_stats["BatchNorm_0"]["mean"])
    np.testing.assert_allclose(new_state.batch_stats["BatchNorm_0"]["mean"], 0.9 * old_mean + 0.1 * batch_mean, atol=1e-5)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_plain_state_has_no_batch_stats(tiny_data):
    state = create_train_state(TrainConfig(batch_norm=False), jax.random.key(0))
    assert state.batch_stats is None
    new_state, _ = train_step(state, *batch(tiny_data))
    assert new_state.batch_stats is None


def test_eval_step_counts_with_the_running_statistics_and_changes_nothing(tiny_data):
    state = create_train_state(TrainConfig(batch_norm=True), jax.random.key(0))
    state, _ = train_step(state, *batch(tiny_data))
    before = jax.tree_util.tree_map(np.asarray, state.batch_stats)
    images, labels = batch(tiny_data, 64)
    totals = eval_step(state, images, labels)
    # By hand: eval mode with the state's own running statistics, nothing mutable.
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    assert int(totals["correct"]) == int(np.sum(np.argmax(logits, -1) == np.asarray(labels)))
    np.testing.assert_allclose(float(totals["loss_sum"]),
                               float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()), rtol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, state.batch_stats)
    # It reads the running statistics (not the batch's): other statistics, other loss.
    shifted = state.replace(batch_stats=jax.tree_util.tree_map(lambda leaf: leaf + 1.0, state.batch_stats))
    assert abs(float(eval_step(shifted, images, labels)["loss_sum"]) - float(totals["loss_sum"])) > 1e-3


def test_eval_step_in_chunks_counts_the_same_examples(tiny_data):
    state = create_train_state(TrainConfig(batch_norm=True), jax.random.key(0))
    for _ in range(3):
        state, _ = train_step(state, *batch(tiny_data))
    images, labels = batch(tiny_data, 64)
    whole = eval_step(state, images, labels)
    # Per-example predictions: the count is exact, the loss sum differs by round-off only.
    for chunk in (8, 16, 48, 64, None):  # 48 does not divide 64: the batch runs whole
        pieces = eval_step(state, images, labels, chunk=chunk)
        assert int(pieces["correct"]) == int(whole["correct"])
        np.testing.assert_allclose(float(pieces["loss_sum"]), float(whole["loss_sum"]), rtol=1e-6)
    wrong_labels = (labels + 1) % 10
    assert int(eval_step(state, images, wrong_labels, chunk=8)["correct"]) != int(whole["correct"])


@pytest.mark.slow
def test_same_config_and_seed_give_identical_history(tiny_data):
    config = TrainConfig(batch_norm=True, max_steps=12, eval_every=4, batch_size=16, shuffle=True)
    first, _ = train(config, tiny_data)
    second, _ = train(config, tiny_data)
    for field in ("steps", "val_accuracy", "val_loss", "train_loss", "train_accuracy"):
        assert getattr(first, field) == getattr(second, field), field
    other_seed, _ = train(dataclasses.replace(config, seed=1), tiny_data)
    assert other_seed.train_loss != first.train_loss


def test_history_records_every_eval_and_the_end(tiny_data):
    history, state = train(TrainConfig(max_steps=10, eval_every=4, batch_size=16), tiny_data)
    assert history.steps == [4, 8, 10]
    assert len(history.val_accuracy) == len(history.train_loss) == len(history.wall_time_s) == 3
    assert int(state.step) == 10 and not history.diverged


def test_epochs_wrap_around_the_training_set(tiny_data):
    # 256 examples / 64 = 4 steps per epoch; 2 epochs.
    history, state = train(TrainConfig(batch_size=64, epochs=2, eval_every=4), tiny_data)
    assert history.steps == [4, 8] and int(state.step) == 8


def test_batch_orders_held_follow_the_steps_trained_not_the_epochs_declared(tiny_data, monkeypatch):
    # 256 examples / 64 = 4 steps per epoch; 6 steps cross one epoch boundary
    # inside the second interval. Declaring 10**11 epochs must cost nothing.
    from bnjax.engine import loop

    held, build = [], loop._batch_orders
    monkeypatch.setattr(loop, "_batch_orders", lambda *args: held.append(build(*args)) or held[-1])
    config = TrainConfig(batch_size=64, epochs=10**11, max_steps=6, eval_every=4)
    [(history, state)] = train_many([config], tiny_data)
    assert [orders.shape for orders in held] == [(1, 2, 256), (1, 2, 256)]  # epochs 0-1, then 1-2
    assert int(state.step) == 6
    [(declared_two, _)] = train_many([dataclasses.replace(config, epochs=2)], tiny_data)
    assert history.train_loss == declared_two.train_loss and history.val_loss == declared_two.val_loss


def test_divergence_is_recorded_and_stops_the_run(tiny_data):
    config = TrainConfig(optimizer="sgd", learning_rate=1e30, max_steps=50, eval_every=5, batch_size=16)
    history, _ = train(config, tiny_data)
    assert history.diverged
    assert history.steps[-1] < 50 and not np.isfinite(history.train_loss[-1])


def test_a_finite_but_exploded_loss_is_divergence(tiny_data):
    # Adam at lr 1000: the loss stays finite (about 5e21) and never comes back.
    config = TrainConfig(learning_rate=1000.0, max_steps=40, eval_every=5, batch_size=16)
    history, _ = train(config, tiny_data)
    assert history.diverged and history.steps == [5]
    assert np.isfinite(history.train_loss[-1]) and history.train_loss[-1] > DIVERGED_LOSS


@pytest.mark.parametrize("loss, diverged", [(float("nan"), True), (float("inf"), True), (-float("inf"), True),
                                            (DIVERGED_LOSS * 1.0001, True), (DIVERGED_LOSS, False), (22.7, False),
                                            (2.3, False)])
def test_the_divergence_rule(loss, diverged):
    assert has_diverged(loss) is diverged


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d._replace(x_train=d.x_train[..., 0]), r"x_train must be \(N, height, width, channels\) uint8, got \(256, 28, 28\)"),
        (lambda d: d._replace(x_test=d.x_test.astype(np.float32)), "x_test must be .* uint8, got .* float32"),
        (lambda d: d._replace(y_train=d.y_train[:-1]), r"y_train must be \(256,\) integers, got \(255,\)"),
        (lambda d: d._replace(y_test=d.y_test + 10), "y_test must hold class indices 0..9"),
    ],
    ids=["no-channel-axis", "float-images", "label-count", "label-range"],
)
def test_bad_data_is_rejected_before_training(tiny_data, change, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(max_steps=1), change(tiny_data))


def test_more_devices_than_visible_is_an_error(tiny_data):
    import jax

    visible = jax.device_count()
    with pytest.raises(ValueError, match=f"num_devices {visible + 63} asked for, but only {visible} devices are visible"):
        train_many([TrainConfig(num_devices=visible + 63, max_steps=1)], tiny_data)


@pytest.mark.slow
def test_mlp_trains_and_probes_are_recorded(tiny_data):
    from experiments.paper_mnist import sigmoid_input_percentiles

    config = TrainConfig(model="mlp", activation="sigmoid", batch_norm=True, batch_size=32, max_steps=8, eval_every=4)
    history, state = train(config, tiny_data, probe=sigmoid_input_percentiles(config, tiny_data))
    assert set(state.params) == {"Dense_0", "Dense_1", "Dense_2", "Dense_3", "BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}
    assert len(history.probes) == 2 and set(history.probes[0]) == {"p15", "p50", "p85"}
    assert history.probes[0]["p15"] <= history.probes[0]["p50"] <= history.probes[0]["p85"]
