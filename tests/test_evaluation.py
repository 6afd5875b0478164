"""`TrainConfig(eval_statistics=...)`: each evaluation of a run also measures
the same weights with precise BN statistics or with each test batch's own
statistics (bnjax/training/evaluation.py), recorded beside the running-average curve,
which stays exactly what it was."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.engine.launch import train_many
from bnjax.engine.strategy import Strategy
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import evaluate
from bnjax.training.precise_bn import recompute_batch_stats
from bnjax.training.steps import to_float_images
from bnjax.training.train import train
from conftest import make_dataset

DATA = make_dataset(num_train=512, num_test=200)
BASE = TrainConfig(batch_norm=True, model="mlp", learning_rate=0.01, epochs=1, eval_every=8, eval_batch_size=100,
                   precise_bn_batches=4)
# The History's evaluation and the direct computation below sum the same
# float32 values in the same batches; measured difference 0 on this VM.
LOSS_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def histories():
    return {statistics: train(dataclasses.replace(BASE, eval_statistics=statistics), DATA)
            for statistics in ("running", "precise", "batch")}


def test_other_statistics_leave_the_running_curves_bit_identical(histories):
    running, _ = histories["running"]
    for statistics in ("precise", "batch"):
        history, _ = histories[statistics]
        for key in ("steps", "val_accuracy", "val_loss", "train_loss", "train_accuracy"):
            assert getattr(history, key) == getattr(running, key), (statistics, key)
    assert running.precise_val_accuracy == [] and running.batch_val_accuracy == []
    assert running.eval_statistics_time_s == 0.0


def test_precise_curve_is_recompute_batch_stats_of_the_same_weights(histories):
    history, state = histories["precise"]
    assert len(history.precise_val_accuracy) == len(history.steps) == 2 and history.batch_val_accuracy == []
    assert history.eval_statistics_time_s > 0
    precise = recompute_batch_stats(state, DATA.x_train, batch_size=32, num_batches=4, seed=0)
    expected = evaluate(state.replace(batch_stats=precise), jnp.asarray(DATA.x_test), jnp.asarray(DATA.y_test), 100)
    assert history.precise_val_accuracy[-1] == expected["accuracy"]
    assert abs(history.precise_val_loss[-1] - expected["loss"]) < LOSS_TOLERANCE
    # and it is another number than the running averages give (they lag the weights)
    assert history.precise_val_loss[-1] != history.val_loss[-1]


def test_batch_curve_normalizes_each_test_batch_by_itself(histories):
    history, state = histories["batch"]
    correct, loss_sum = 0, 0.0
    for first in range(0, 200, 100):  # test batches of eval_batch_size, in train mode
        images = to_float_images(jnp.asarray(DATA.x_test[first:first + 100]))
        labels = DATA.y_test[first:first + 100]
        logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                                   mutable=["batch_stats"])
        logits = np.asarray(logits, np.float64)
        correct += int(np.sum(logits.argmax(-1) == labels))
        shifted = logits - logits.max(-1, keepdims=True)
        loss_sum += float(np.sum(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(100), labels]))
    assert history.batch_val_accuracy[-1] == correct / 200
    assert abs(history.batch_val_loss[-1] - loss_sum / 200) < 1e-5  # float32 net vs. float64 softmax here
    assert history.batch_val_loss[-1] != history.val_loss[-1]


def test_stacked_runs_each_get_their_own_precise_curve(histories):
    # Two seeds in one vmapped program: seed 0's precise curve is the one of seed 0 alone.
    configs = [dataclasses.replace(BASE, eval_statistics="precise", seed=seed) for seed in (0, 1)]
    results = train_many(configs, DATA, strategy=Strategy(models_per_program=2))
    alone, _ = histories["precise"]
    stacked, other_seed = results[0][0], results[1][0]
    assert stacked.precise_val_accuracy == alone.precise_val_accuracy
    assert np.max(np.abs(np.array(stacked.precise_val_loss) - alone.precise_val_loss)) < 1e-5  # vmapped round-off
    assert other_seed.precise_val_loss != stacked.precise_val_loss


@pytest.mark.parametrize("changes, message", [
    (dict(eval_statistics="population"), "unknown eval_statistics 'population'; allowed: batch, precise, running"),
    (dict(eval_statistics="precise", batch_norm=False),
     "eval_statistics 'precise' needs BN statistics, and this model has no BN (batch_norm=False); "
     "use 'running' or batch_norm=True"),
    (dict(precise_bn_batches=0), "precise_bn_batches must be a positive integer, got 0"),
])
def test_bad_evaluation_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(BASE, **changes)
    assert str(error.value) == message


def test_more_precise_batches_than_the_training_set_holds_is_refused_before_training():
    config = dataclasses.replace(BASE, eval_statistics="precise", precise_bn_batches=17)
    with pytest.raises(ValueError, match=r"^precise_bn_batches 17 x batch_size 32 = 544 training images; the training set has 512$"):
        train(config, DATA)


def test_one_door_gives_each_kind_of_statistics_as_the_loop_recorded_it(histories):
    images, labels = jnp.asarray(DATA.x_test), jnp.asarray(DATA.y_test)
    for statistics in ("running", "batch"):
        history, state = histories[statistics]
        measured = evaluate(state, images, labels, 100, statistics=statistics)
        curve = "val_accuracy" if statistics == "running" else "batch_val_accuracy"
        assert measured["accuracy"] == getattr(history, curve)[-1], statistics


@pytest.mark.parametrize("statistics, precise_batches, message", [
    ("population", None, "unknown eval_statistics 'population'; allowed: batch, precise, running"),
    ("precise", None, "eval_statistics 'precise' needs precise_batches, the training batches to estimate from"),
])
def test_the_evaluation_door_refuses_what_it_cannot_measure_in_one_line(histories, statistics, precise_batches,
                                                                         message):
    _, state = histories["running"]
    with pytest.raises(ValueError) as error:
        evaluate(state, jnp.asarray(DATA.x_test), jnp.asarray(DATA.y_test), 100, statistics=statistics,
                 precise_batches=precise_batches)
    assert str(error.value) == message
