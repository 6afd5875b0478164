"""BN's settings as one value of `TrainConfig` (`bn`, an unbound BatchNorm
checked by its own checks): refused on a run without BN, refused where they
set what the net sets, one spelling per run, and the flat form of results
and checkpoints written before (`bn_*` fields) still read
(tests/fixtures/make_flat_form_fixtures.py wrote them with that bnjax)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from bnjax.bn.batchnorm import BatchNorm, Renorm
from bnjax.bn.noisy import NoisyBatchNorm
from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig, bn_from_dict
from bnjax.training.train import train
from conftest import make_dataset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fields, message", [
    (dict(bn=keras_bn(momentum=0.9)), "bn=BatchNorm(momentum=0.9, epsilon=0.001) is a BN setting"),
    (dict(ghost_bn=True), "ghost_bn=True is a BN setting"),
    (dict(bn_use_bias=True), "bn_use_bias=True is a BN setting"),
    (dict(bn_position="after"), "bn_position='after' is a BN setting"),
])
def test_a_bn_setting_on_a_run_without_bn_is_refused_in_one_line(fields, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**fields)
    assert str(error.value) == (f"{message}, and this run has no BN (batch_norm=False); set batch_norm=True or leave "
                                "it at its default")


@pytest.mark.parametrize("bn, message", [
    (keras_bn(axis_name="data"), "bn.axis_name is set by the net for each of its BN layers; leave it at None, got "
                                   "'data'"),
    (keras_bn(use_scale=False), "bn.use_scale is set by the net for each of its BN layers; leave it at True, got "
                                  "False"),
    ({"momentum": 0.9}, "bn must be None or a bnjax.BatchNorm(...) of BN's settings, got {'momentum': 0.9}"),
])
def test_bn_leaves_the_nets_fields_to_the_net(bn, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(batch_norm=True, bn=bn)
    assert str(error.value) == message


def test_a_run_has_one_spelling_and_its_saved_form_says_what_its_bn_used():
    default = TrainConfig(batch_norm=True)
    assert TrainConfig(batch_norm=True, bn=keras_bn()) == default and default.bn is None
    assert hash(TrainConfig(batch_norm=True, bn=keras_bn(momentum=0.9))) == hash(
        TrainConfig(batch_norm=True, bn=keras_bn(momentum=0.9)))
    assert default.to_dict()["bn"] == {"layer": "BatchNorm", "momentum": 0.99, "epsilon": 0.001,
                                       "use_fast_variance": True, "running_average": "ema",
                                       "unbiased_running_var": False, "renorm": None, "frozen": False,
                                       "ghost_batch_size": None}
    assert TrainConfig().to_dict()["bn"] is None
    for config in (default, TrainConfig(batch_norm=True, bn=keras_bn(renorm=Renorm(r_max=2.0, warmup_steps=3))),
                   TrainConfig(batch_norm=True, bn=keras_bn(NoisyBatchNorm, noise_shift=0.5)), TrainConfig()):
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_layer_used_is_bn_with_the_device_axis():
    config = TrainConfig(batch_norm=True, bn=keras_bn(frozen=True))
    assert config.bn_layer("data") == BatchNorm(momentum=0.99, epsilon=1e-3, frozen=True, axis_name="data")
    assert TrainConfig(batch_norm=True).bn_layer() == BatchNorm(momentum=0.99, epsilon=1e-3)


@pytest.mark.parametrize("settings, message", [
    ({"layer": "GroupNorm"}, "unknown bn.layer 'GroupNorm'; allowed: BatchNorm, LpBatchNorm, NoisyBatchNorm"),
    ({"noise_shift": 1.0}, "bn (BatchNorm) has no setting 'noise_shift'; its settings: momentum, epsilon, "
                           "use_fast_variance, running_average, unbiased_running_var, renorm, frozen, ghost_batch_size"),
    ({"renorm": {"r_max": 0.5}}, "bn.renorm: r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got 0.5"),
    ({"epsilon": -1.0}, "bn: epsilon must be a number > 0, got -1.0"),
])
def test_saved_bn_settings_are_checked_in_one_line(settings, message):
    with pytest.raises(ValueError) as error:
        bn_from_dict(settings)
    assert str(error.value) == message


def test_results_in_the_flat_form_read_as_the_runs_they_were():
    runs = json.loads((FIXTURES / "flat_form_results.json").read_text())["runs"]
    lstm, renorm, ignored = (TrainConfig.from_dict(run["config"]) for run in runs)
    assert lstm.model == "lstm" and lstm.bn == BatchNorm(momentum=0.99, epsilon=1e-5, use_fast_variance=False)
    assert renorm.bn == BatchNorm(momentum=0.9, epsilon=1e-3, renorm=Renorm(warmup_steps=5))
    # A run without BN trained without it, whatever its BN fields said.
    assert ignored == TrainConfig() and ignored.to_dict()["bn"] is None


def test_a_checkpoint_in_the_flat_form_resumes(tmp_path):
    runs = json.loads((FIXTURES / "flat_form_results.json").read_text())["runs"]
    config = TrainConfig.from_dict(runs[0]["config"])
    checkpoint = tmp_path / "run.msgpack"
    shutil.copy(FIXTURES / "flat_form_checkpoint.msgpack", checkpoint)
    history, state = train(config, make_dataset(), checkpoint_path=checkpoint)  # resumed at its last step: done
    assert history.val_accuracy == runs[0]["val_accuracy"] and history.train_loss == runs[0]["train_loss"]
    assert int(state.step) == 2
    with pytest.raises(ValueError, match=r"is from another config \(bn: saved .*'epsilon': 1e-05"):
        train(dataclasses.replace(config, bn=None), make_dataset(), checkpoint_path=checkpoint)
