"""experiments/rethinking_batch.py: the five parts' configs, the start-up lag,
the shifted test sets, and one part's measurement and summary end to end on
synthetic data."""


import numpy as np
import pytest

from bnjax.bn.batchnorm import keras_bn
from bnjax.training.config import TrainConfig
from bnjax.training.train import train
from conftest import make_dataset
from experiments import rethinking_batch as study
from experiments.results import last_full_interval, last_full_interval_index


def test_every_part_trains_the_configs_its_question_needs():
    rules = study.rules_configs(3)
    assert len(rules) == 30 and {config.activation for config in rules} == {"sigmoid"}
    # Precise BN is measured once per (lr, seed): in the 'ema 0.99' runs.
    precise = [(config.learning_rate, config.seed) for config in rules if config.eval_statistics == "precise"]
    assert sorted(precise) == sorted((lr, seed) for lr in (0.001, 0.01) for seed in range(3))
    assert all(config.bn_layer().running_average == "ema" and config.bn_layer().momentum == 0.99 for config in rules
               if config.eval_statistics == "precise")
    for size in study.SIZES.values():
        norm = study.norm_batch_configs(1, size)
        assert [study.normalization_batch(config) for config in norm] == list(size.norm_sizes)
        assert all(config.batch_size == size.norm_batch for config in norm)
        assert norm[-1].bn_layer().ghost_batch_size is None and norm[0].bn_layer().ghost_batch_size == 2
        renorm = study.renorm_configs(1, size)
        assert [(config.batch_size, config.bn_layer().renorm is not None, config.steps_per_epoch)
                for config in renorm] == [
            (batch, renorm, size.renorm_examples // batch) for batch in study.RENORM_BATCH_SIZES
            for renorm in (False, True)]
        assert {config.epochs for config in study.samples_configs(1, size) + study.shift_configs(1, size)} == {
            size.epochs}
    assert len(study.samples_configs(3)) == 6 and len(study.shift_configs(3)) == 3


def test_startup_lag_is_the_first_step_at_which_running_comes_close():
    steps = [50, 100, 150, 200]
    assert study.startup_lag(steps, [0.1, 0.90, 0.93, 0.5], [0.96, 0.96, 0.97, 0.97]) == 150
    assert study.startup_lag(steps, [0.97, 0.5, 0.97, 0.97], [0.97, 0.97, 0.97, 0.97]) == 50
    assert study.startup_lag(steps, [0.1, 0.2, 0.3, 0.5], [0.97, 0.97, 0.97, 0.97]) is None


def test_training_accuracy_comes_from_the_last_full_evaluation_interval():
    # experiments/results.py, shared with the batch-size ablation
    run = {"steps": [312, 624, 626], "config": {"eval_every": 312}, "train_accuracy": [0.9, 0.95, 1.0]}
    assert last_full_interval(run, "train_accuracy") == 0.95  # the last 2 steps are not an interval's worth
    assert last_full_interval_index(run) == 1
    run = {"steps": [312, 624], "config": {"eval_every": 312}, "train_accuracy": [0.9, 0.95]}
    assert last_full_interval(run, "train_accuracy") == 0.95 and last_full_interval_index(run) == 1


def test_shifted_test_sets_are_deterministic_uint8_copies():
    images = make_dataset(num_train=32, num_test=16).x_test
    first, second = study.shifted_test_sets(images), study.shifted_test_sets(images)
    assert list(first) == ["clean", "noise (std 0.3)", "rotated 30°", "low contrast (x 0.4 + 0.3)", "inverted"]
    for name, shifted in first.items():
        assert shifted.dtype == np.uint8 and shifted.shape == images.shape
        np.testing.assert_array_equal(shifted, second[name])
    np.testing.assert_array_equal(first["inverted"], 255 - images)
    assert first["low contrast (x 0.4 + 0.3)"].min() >= 76 and first["low contrast (x 0.4 + 0.3)"].max() <= 178
    assert np.abs(first["noise (std 0.3)"].astype(int) - images).mean() > 20


@pytest.mark.slow
def test_norm_batch_measurement_and_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "GROUPED_EXAMPLES", 512)
    monkeypatch.setattr(study, "POPULATION_BATCHES", 2)
    data = make_dataset(num_train=512, num_test=256)
    runs = []
    for size in (8, None):
        config = TrainConfig(batch_norm=True, model="mlp", batch_size=256, max_steps=2, eval_every=2,
                             bn=keras_bn(ghost_batch_size=size) if size else None)
        history, state = train(config, data)
        record = study.measure_norm_batch(config, history, state, data)
        assert set(record) == {"train_batch_accuracy", "test_batch_accuracy", "test_population_accuracy",
                               "train_population_accuracy"}
        assert all(0.0 <= value <= 1.0 for value in record.values())
        runs.append({"config": config.to_dict(), **history.to_dict(), **record})
    table = study.summarize_norm_batch(runs, tmp_path)
    assert (tmp_path / "norm_batch.png").exists()
    rows = [line for line in table.splitlines() if line.startswith("| 8 |") or line.startswith("| 256 |")]
    assert len(rows) == 2 and f"{runs[0]['test_batch_accuracy']:.4f}" in rows[0]
