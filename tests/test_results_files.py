"""Results files as bnjax writes and reads them: standard JSON (NaN saved as
null and read back as NaN), and every malformed file refused in one line that
names it, before any work, leaving the file as it was."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from bnjax.support.atomic import write_json
from bnjax.training.config import TrainConfig
from experiments import plot_article, sweep
from experiments import results as results_module
from experiments.results import load_results

CONFIG = TrainConfig(max_steps=4, eval_every=2)


def saved_run(**changes) -> dict:
    run = {"config": CONFIG.to_dict(), "steps": [2, 4], "val_accuracy": [0.5, 0.6],
           "val_loss": [1.0, 0.9], "train_accuracy": [0.4, 0.5], "train_loss": [1.2, 1.1],
           "wall_time_s": [1.0, 2.0], "precise_val_accuracy": [], "precise_val_loss": [], "batch_val_accuracy": [],
           "batch_val_loss": [], "probes": [], "diverged": False, "total_wall_time_s": 2.0, "eval_time_s": 0.1,
           "eval_statistics_time_s": 0.0}
    return {**run, **changes}


def test_nan_and_infinity_are_written_as_null_and_read_back_as_nan(tmp_path):
    path = tmp_path / "results.json"
    run = saved_run(train_loss=[1.2, float("nan")], val_loss=[float("inf"), 0.9], diverged=True)
    write_json(path, {"environment": {}, "runs": [run]})
    text = path.read_text()
    # Standard JSON: a strict parser (which refuses NaN / Infinity) reads it.
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict["runs"][0]["train_loss"] == [1.2, None] and strict["runs"][0]["val_loss"] == [None, 0.9]
    loaded = load_results(path)["runs"][0]
    assert loaded["train_loss"][0] == 1.2 and math.isnan(loaded["train_loss"][1])
    assert math.isnan(loaded["val_loss"][0])


MALFORMED = {
    "not-utf8": (b'{"runs": [\xff\xfe]}', "cannot read .*utf-8"),
    "json-syntax": (b'{"runs": [', "cannot read .*Expecting"),
    "no-runs-list": (b'{"runs": 3}', "has no top-level 'runs' list"),
    "run-not-object": (json.dumps({"runs": [[1, 2]]}).encode(), "run 0 is list, not an object"),
    "no-config": (json.dumps({"runs": [{k: v for k, v in saved_run().items() if k != "config"}]}).encode(),
                  "run 0 has no config"),
    "invalid-config": (json.dumps({"runs": [saved_run(config={**CONFIG.to_dict(), "batch_size": 0})]}).encode(),
                       r"run 0 has an invalid config \(batch_size must be a positive integer, got 0\)"),
    "config-wrong-type": (json.dumps({"runs": [saved_run(config={**CONFIG.to_dict(), "activation": 7})]}).encode(),
                          "run 0 has an invalid config"),
    "steps-not-increasing": (json.dumps({"runs": [saved_run(steps=[4, 2])]}).encode(),
                             r"run 0 has steps \[4, 2\], not increasing positive integers"),
    "curve-too-short": (json.dumps({"runs": [saved_run(val_accuracy=[0.5])]}).encode(),
                        "run 0 has val_accuracy of 1 values for its 2 steps"),
    "curve-missing": (json.dumps({"runs": [{k: v for k, v in saved_run().items() if k != "train_loss"}]}).encode(),
                      "run 0 has train_loss of 0 values for its 2 steps"),
    "curve-of-strings": (json.dumps({"runs": [saved_run(val_loss=["a", "b"])]}).encode(),
                         "run 0 has val_loss values that are not numbers"),
    "no-diverged-flag": (json.dumps({"runs": [saved_run(diverged=None)]}).encode(),
                         r"run 0 has no diverged flag \(true or false\)"),
    "second-run-bad": (json.dumps({"runs": [saved_run(), saved_run(precise_val_accuracy=[0.9])]}).encode(),
                       "run 1 has precise_val_accuracy of 1 values for its 2 steps"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_results_file_is_one_line_and_is_left_as_it_was(tmp_path, capsys, name):
    content, message = MALFORMED[name]
    path = tmp_path / "results.json"
    path.write_bytes(content)

    def no_data():
        raise AssertionError("work started on a results file that cannot be read")

    with pytest.raises(SystemExit) as exit_info:
        sweep.run_sweep([CONFIG], path, no_data)
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and str(path) in error and len(error.splitlines()) == 1, error
    assert re.search(message, error, flags=re.IGNORECASE), error
    assert path.read_bytes() == content


def test_every_committed_results_file_loads():
    from pathlib import Path

    paths = sorted(Path(__file__).parent.parent.glob("outputs/**/results.json"))
    assert paths
    for path in paths:
        assert load_results(path)["runs"], path


def test_the_article_figures_take_runs_evaluated_at_different_steps(tmp_path):
    # One seed saved with fewer evaluations, one that stopped early: every curve
    # is placed by its steps, NaN where a run has no value.
    early = saved_run(steps=[2], val_accuracy=[0.3], val_loss=[2.0], train_accuracy=[0.2], train_loss=[2.1],
                      wall_time_s=[1.0], diverged=True)
    denser = saved_run(steps=[1, 2, 3, 4], val_accuracy=[0.1, 0.2, 0.3, 0.4], val_loss=[1, 1, 1, 1],
                       train_accuracy=[0.1, 0.2, 0.3, 0.4], train_loss=[1, 1, 1, 1], wall_time_s=[1, 2, 3, 4])
    runs = [saved_run(), early, denser]
    steps, values = plot_article.stacked(runs, "val_accuracy")
    assert steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(values, [[np.nan, 0.5, np.nan, 0.6], [np.nan, 0.3, np.nan, np.nan],
                                           [0.1, 0.2, 0.3, 0.4]])
    path = tmp_path / "results.json"
    configs = [dataclasses.replace(CONFIG, batch_norm=bn, seed=seed) for bn in (False, True) for seed in range(3)]
    write_json(path, {"environment": {}, "dataset": "mnist",
                      "runs": [{**run, "config": config.to_dict()} for config, run in zip(configs, runs * 2)]})
    plot_article.plot_all(path)
    assert "1 diverged" in (tmp_path / "summary.md").read_text()
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_over_several_processes_process_0_alone_writes_the_results(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    monkeypatch.setattr(results_module.jax, "process_index", lambda: 1)
    results_module.save_results(path, {"runs": []})
    assert not path.exists()
    monkeypatch.setattr(results_module.jax, "process_index", lambda: 0)
    results_module.save_results(path, {"runs": []})
    assert json.loads(path.read_text())["runs"] == []
