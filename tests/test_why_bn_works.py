"""The study of why BN helps (experiments/why_bn_works.py): its grid, its
probe, its report's paired comparisons, and the deep linear network's runs."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from bnjax.bn.lp_norm import LpBatchNorm
from bnjax.bn.noisy import NoisyBatchNorm
from bnjax.engine.launch import Observer, train_many
from bnjax.engine.strategy import Strategy
from bnjax.training.steps import create_train_state
from experiments import deep_linear, why_bn_works, why_bn_works_report
from experiments.results import add_run, load_results


def test_the_grid_pairs_every_net_over_the_same_seeds_at_the_papers_and_the_articles_optimizers():
    configs = why_bn_works.study_configs(steps=1000, seeds=5)
    parts = {part.name: part for part in why_bn_works.PARTS}
    assert len(configs) == 5 * sum(len(part.variants) for part in why_bn_works.PARTS) == 90
    for config in configs:
        saved = config.to_dict()
        part = parts[why_bn_works.part_of(saved)]
        assert why_bn_works.variant_of(saved) in part.variants and config.seed in range(5)
        assert (config.optimizer, config.learning_rate, config.activation) == (part.optimizer, part.learning_rate,
                                                                              part.activation)
        assert config.max_steps == (200 if part.name == "sigmoid" else 1000) and config.batch_size == 32
    noisy = [c for c in configs if why_bn_works.variant_of(c.to_dict()) == "noisy BN"]
    assert all(c.bn.noise_shift == 0.5 and c.bn.noise_scale_max == 1.25 and c.bn.noise_jitter == 0.1
               and c.bn.noise_scale_law == "uniform" and not c.bn.noise_logits for c in noisy)
    assert {c.bn.p for c in configs if isinstance(c.bn, LpBatchNorm)} == {1, 2, math.inf}


@pytest.mark.parametrize("variant, norms", [
    ("plain", [()] * 5), ("BN", [(f"BatchNorm_{k}",) for k in range(5)]),
    ("noisy BN", [(f"NoisyBatchNorm_{k}",) for k in range(4)] + [("BatchNorm_0",)]),
    ("plain + noise", [(f"NoisyBatchNorm_{k}",) for k in range(5)]),
    ("linf BN", [(f"LpBatchNorm_{k}",) for k in range(5)])])
def test_each_layer_is_grouped_with_the_normalization_after_it(variant, norms):
    config = next(c for c in why_bn_works.study_configs(steps=10, seeds=1)
                  if why_bn_works.variant_of(c.to_dict()) == variant)
    params = create_train_state(config, jax.random.key(0)).params
    groups = why_bn_works.layer_groups(params)
    assert [group[0] for group in groups] == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
    assert [group[1:] for group in groups] == norms


def test_the_noise_off_twin_of_each_net():
    configs = {why_bn_works.variant_of(c.to_dict()): c for c in why_bn_works.study_configs(steps=10, seeds=1)}
    for variant in ("noisy BN", "plain + noise", "noisy BN, logits too"):
        quiet = why_bn_works.without_noise(configs[variant]).bn_layer()
        assert isinstance(quiet, NoisyBatchNorm) and (quiet.noise_shift, quiet.noise_scale_max,
                                                      quiet.noise_jitter) == (0.0, 1.0, 0.0)
    for variant in ("plain", "BN", "l1 BN"):
        assert why_bn_works.without_noise(configs[variant]) is configs[variant]


def test_paired_comparisons_read_as_differences_or_ratios():
    text, verdict = why_bn_works_report.compare([0.2, 0.3, 0.25], [0.4, 0.52, 0.44], ratio=False)
    assert text.startswith("-0.2033 [") and verdict == "lower"
    text, verdict = why_bn_works_report.compare([2.0, 4.2, 8.0], [1.0, 2.0, 4.1], ratio=True)
    assert text.startswith("x2.0") and verdict == "higher"
    assert why_bn_works_report.compare([1.0, 2.0], [1.0, np.nan], ratio=False) == (
        "not comparable: 1 of 2 second net's seeds diverged", "n/a")
    assert why_bn_works_report.compare([0.0, 1.0], [1.0, 1.0], ratio=True) == (
        "not comparable (a value is not positive)", "n/a")


@pytest.mark.slow  # compiles each layer's gradient of two nets
def test_the_deep_linear_networks_runs_are_measured_from_step_0_and_saved_once(tmp_path, monkeypatch):
    monkeypatch.setattr(deep_linear, "MEASURE_EVERY", 2)
    monkeypatch.setattr(deep_linear, "DEPTH", 12)  # 25 in the study; 12 keeps the layers' names past Dense_9
    record = deep_linear.train(batch_norm=True, learning_rate=0.01, seed=0, steps=4)
    assert record["steps"] == [0, 2, 4] and len(record["loss"]) == 3
    assert list(record["ics"]["relative"]) == [f"Dense_{k}" for k in range(1, 12)]  # by depth
    assert all(len(values) == 3 and all(value > 0 for value in values)
               for values in record["ics"]["relative"].values())
    path = tmp_path / "deep_linear.json"
    monkeypatch.setattr(deep_linear, "LEARNING_RATES", (0.01,))
    saved = deep_linear.run(path, seeds=2, max_steps=2)
    assert len(saved["runs"]) == 4 and saved["steps"] == 2
    monkeypatch.setattr(deep_linear, "train", lambda *args: pytest.fail("trained again"))
    assert deep_linear.run(path, seeds=2, max_steps=2)["runs"] == saved["runs"]


@pytest.mark.slow
def test_the_probe_sees_the_noise_from_step_0_and_the_report_reads_the_runs(tiny_data, tmp_path):
    wanted = ("plain", "BN", "noisy BN", "plain + noise")
    configs = [dataclasses.replace(config, max_steps=4, eval_every=2, eval_batch_size=32)
               for config in why_bn_works.study_configs(steps=4, seeds=1)
               if why_bn_works.part_of(config.to_dict()) == "sgd 0.1"
               and why_bn_works.variant_of(config.to_dict()) in wanted]
    path = tmp_path / "results.json"
    results = load_results(path)
    trained = train_many(configs, tiny_data, strategy=Strategy(), observer=Observer(why_bn_works.landscape_probe))
    probes = {}
    for config, (history, state) in zip(configs, trained):
        start = why_bn_works.probe_at_start(config, history, state, tiny_data)
        add_run(path, results, config, history, start)
        variant = why_bn_works.variant_of(config.to_dict())
        probes.setdefault(variant, []).append([start["probe_at_start"]] + history.probes)
        assert all(sorted(probe) == sorted(start["probe_at_start"]) for probe in history.probes)
        assert all(np.isfinite(value) for probe in history.probes for value in probe.values())
        assert all(-1.0 <= probe[f"ics_cosine/{layer}"] <= 1.0 + 1e-6 for probe in history.probes
                   for layer in why_bn_works_report.HIDDEN)
    at_start = probes["BN"][0][0]
    again = why_bn_works.landscape_probe(configs[1], tiny_data)(create_train_state(configs[1], jax.random.key(0)))
    assert again == at_start  # step 0 is the run's own initial state
    for variant in ("plain", "BN"):  # nothing to switch off: the same numbers
        for probe in probes[variant][0]:
            assert probe["train_loss_noise_on"] == probe["train_loss_noise_off"]
    for variant in ("noisy BN", "plain + noise"):  # the noise moves the loss and each layer's inputs
        assert all(probe["train_loss_noise_on"] != probe["train_loss_noise_off"] for probe in probes[variant][0])
        assert probes[variant][0][0]["mean_shift/Conv_2"] > 10 * probes["BN"][0][0]["mean_shift/Conv_2"]
    why_bn_works_report.report(tmp_path, command="test")
    for name in ("noisy_bn.png", "moments.png", "ics_relative.png", "ics_cosine.png", "smoothness.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert "| BN trains faster | final training loss, noise off | sgd 0.1 | BN vs plain |" in summary
    assert summary.count("| BN does not reduce ICS |") == 8  # 4 layers x (relative, cosine)
    assert "| Conv_1: \\|\\|G - G'\\|\\| / \\|\\|G\\|\\| |" in summary  # a measure's bars escaped
