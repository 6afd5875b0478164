"""bnjax.checkup: the metric with running, precise and batch statistics, each
BN layer's gap and a verdict, for linen and NNX models; its numbers are
those of the evaluations it summarizes."""


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax.nets.nnx_model import NNXConvNet, linen_to_nnx
from bnjax.training.config import TrainConfig
from bnjax.training.evaluation import batch_statistics_accuracy, evaluate
from bnjax.training.precise_bn import recompute_batch_stats
from bnjax.training.steps import model_of, to_float_images
from bnjax.training.train import train
from conftest import make_dataset

DATA = make_dataset(num_train=512, num_test=128)


@pytest.fixture(scope="module")
def trained():
    """The article's BN net with sigmoid at lr 0.01, 40 steps: its running averages lag its weights."""
    config = TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=0.01, max_steps=40, eval_every=40)
    return train(config, DATA)[1]


def checkup_of(state, **options):
    model = model_of(state)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_batches = [to_float_images(jnp.asarray(DATA.x_train[first:first + 32])) for first in range(0, 512, 32)]
    eval_batches = [(to_float_images(jnp.asarray(DATA.x_test[first:first + 32])), DATA.y_test[first:first + 32])
                    for first in range(0, 128, 32)]
    return bnjax.checkup(model, variables, train_batches, eval_batches, bnjax.accuracy,
                         train_kwargs={"train": True}, eval_kwargs={"train": False}, **options)


def test_its_numbers_are_the_evaluations_it_summarizes(trained):
    report = checkup_of(trained)
    assert report.running == pytest.approx(evaluate(trained, DATA.x_test, DATA.y_test)["accuracy"])
    precise = recompute_batch_stats(trained, DATA.x_train, batch_size=32, num_batches=16, seed=None)
    assert report.precise == pytest.approx(
        evaluate(trained.replace(batch_stats=precise), DATA.x_test, DATA.y_test)["accuracy"])
    assert report.batch == pytest.approx(float(batch_statistics_accuracy(trained, DATA.x_test, DATA.y_test, 32)))
    assert set(report.layers) == {f"BatchNorm_{index}" for index in range(5)}
    gaps = [gap["mean_gap"] for gap in report.layers.values()]
    assert min(gaps) > 0 and all(gap["var_ratio_min"] <= gap["var_ratio_max"] for gap in report.layers.values())
    assert report.verdict.startswith("stale" if report.stale else "up to date")
    assert str(report).splitlines()[-1] == report.verdict and "BatchNorm_4" in str(report)


def test_the_verdict_follows_the_tolerance(trained):
    report = checkup_of(trained, tolerance=0.0)
    assert report.stale == (report.precise > report.running)
    never = checkup_of(trained, tolerance=1.0)
    assert not never.stale and never.verdict.startswith("up to date")
    # Precise statistics in place of the running ones: nothing left to gain.
    precise = recompute_batch_stats(trained, DATA.x_train, batch_size=32, num_batches=16, seed=None)
    fixed = checkup_of(trained.replace(batch_stats=precise), tolerance=0.0)
    assert fixed.running == fixed.precise and not fixed.stale
    assert max(gap["mean_gap"] for gap in fixed.layers.values()) < 1e-3


def test_nnx_checkup_equals_linen(trained):
    linen_report = checkup_of(trained)
    model = NNXConvNet("sigmoid", rngs=nnx.Rngs(0))
    linen_to_nnx(model, {"params": trained.params, "batch_stats": trained.batch_stats})
    before = np.asarray(model.norms[0].mean[...])
    train_batches = [to_float_images(jnp.asarray(DATA.x_train[first:first + 32])) for first in range(0, 512, 32)]
    eval_batches = [(to_float_images(jnp.asarray(DATA.x_test[first:first + 32])), DATA.y_test[first:first + 32])
                    for first in range(0, 128, 32)]
    report = bnjax.nnx.checkup(model, train_batches, eval_batches, bnjax.accuracy)
    for field in ("running", "precise", "batch", "stale"):
        assert getattr(report, field) == getattr(linen_report, field), field
    np.testing.assert_array_equal(model.norms[0].mean[...], before)  # the model is left as it was


def test_bad_requests_are_refused_in_one_line(trained):
    with pytest.raises(ValueError, match="^tolerance must be a number >= 0, got -1$"):
        checkup_of(trained, tolerance=-1)
    with pytest.raises(ValueError, match="^checkup needs at least one evaluation batch, got none$"):
        bnjax.checkup(model_of(trained), {"params": trained.params, "batch_stats": trained.batch_stats},
                      [to_float_images(jnp.asarray(DATA.x_train[:32]))], [], bnjax.accuracy,
                      train_kwargs={"train": True}, eval_kwargs={"train": False})


def test_the_study_refuses_bad_arguments_in_one_line(capsys):
    from experiments import bn_checkup

    with pytest.raises(SystemExit):
        bn_checkup.main(["--steps", "0"])
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err
