"""The study of why BN helps (experiments/why_bn_works.py): its grid, its
probe on the article's CNN, and its report from saved runs."""

import dataclasses

import jax
import numpy as np
import pytest

from bnjax.engine.launch import Observer, train_many
from bnjax.engine.strategy import Strategy
from bnjax.training.steps import create_train_state
from experiments import why_bn_works
from experiments.results import add_run, load_results


def test_the_grid_is_the_articles_settings_times_three_nets_and_the_seeds():
    configs = why_bn_works.study_configs(steps=1000, eval_every=50, seeds=3)
    assert len(configs) == 4 * 3 * 3
    assert {(c.learning_rate, c.activation) for c in configs} == set(why_bn_works.SETTINGS)
    assert {why_bn_works.variant_of(c.to_dict()) for c in configs} == set(why_bn_works.VARIANTS)
    assert all(c.optimizer == "adam" and c.batch_size == 32 and c.max_steps == 1000 for c in configs)


@pytest.mark.parametrize("variant, norm", [("plain", None), ("BN", "BatchNorm"), ("noisy BN", "NoisyBatchNorm")])
def test_each_layer_is_grouped_with_its_own_bn(variant, norm):
    config = why_bn_works.study_configs(steps=10, eval_every=5, seeds=1)[list(why_bn_works.VARIANTS).index(variant)]
    params = create_train_state(config, jax.random.key(0)).params
    groups = why_bn_works.layer_groups(params)
    assert [group[0] for group in groups] == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
    assert [group[1:] for group in groups] == ([()] * 5 if norm is None else [(f"{norm}_{k}",) for k in range(5)])


@pytest.mark.slow
def test_the_probe_sees_the_noise_move_layer_inputs_and_the_report_reads_the_runs(tiny_data, tmp_path):
    configs = [dataclasses.replace(config, max_steps=4, eval_every=2, eval_batch_size=32)
               for config in why_bn_works.study_configs(steps=4, eval_every=2, seeds=1)[:3]]  # relu, lr 0.001
    path = tmp_path / "results.json"
    results = load_results(path)
    trained = train_many(configs, tiny_data, strategy=Strategy(), observer=Observer(why_bn_works.landscape_probe))
    for config, (history, _) in zip(configs, trained):
        add_run(path, results, config, history)
        assert [sorted(probe) == sorted(history.probes[0]) for probe in history.probes] == [True, True]
        assert all(np.isfinite(value) for probe in history.probes for value in probe.values())
        assert all(0.0 <= probe["loss_spread"] and -1.0 <= probe["ics_cosine"] <= 1.0 for probe in history.probes)
    shift = {why_bn_works.variant_of(c.to_dict()): h.probes[0]["mean_shift"] for c, (h, _) in
             zip(configs, trained)}
    # One optimizer step moves a BN net's layer inputs by little; the noise
    # (a shift of up to one standard deviation of the BN output) by much more.
    assert shift["noisy BN"] > 10 * shift["BN"]
    why_bn_works.report(path)
    for name in ("noisy_bn.png", "internal_covariate_shift.png", "smoothness.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert "4 steps, 1 seed per row" in summary and summary.count("| 0.001 | relu |") == 3
