"""End to end on real MNIST through the public API: the article sweep writes
complete, resumable results. That a short run of the article's BN net clearly
learns MNIST (test accuracy > 0.9 with the running averages after 600 steps;
not fewer: with momentum 0.99 the first BN's running variance still carries
its start of 1 at step 300, where eval mode scores ~0.16) is asserted by the
BN state tour notebook, which trains that run (tests/test_notebooks.py)."""

import json
import shutil
from pathlib import Path

import pytest

from experiments import article


@pytest.mark.slow
def test_article_sweep_smoke_writes_results_and_resumes(tmp_path, mnist, monkeypatch, capsys):
    monkeypatch.setattr(article, "load_dataset", lambda *args: mnist)
    # One run at a time in this process: two worker processes would each start
    # JAX and compile every model afresh (124 vs. 71 CPU-s for this test);
    # tests/test_engine.py and tests/test_sweep.py cover the worker processes.
    # Without the precise-BN curves (12 of this test's 55 s): the Colab
    # notebook's smoke run (tests/test_notebooks.py) runs the sweep as it
    # comes, precise BN included.
    argv = ["--seeds", "1", "--max-steps", "20", "--parallel-runs", "1", "--no-precise-bn", "--out", str(tmp_path)]
    article.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 6  # 3 (lr, activation) pairs x plain/BN x 1 seed
    for run in results["runs"]:
        assert run["steps"] == [20] and len(run["val_accuracy"]) == 1 and run["diverged"] is False
        assert set(run["config"]) >= {"batch_norm", "activation", "learning_rate", "seed", "batch_size"}
    assert {"jax", "flax", "optax", "device"} <= set(results["environment"])
    pngs = sorted(path.name for path in tmp_path.glob("*.png"))
    assert len(pngs) == 3 and "sigmoid_lr0.01_epochs3_max20.png" in pngs
    assert "| 0.01 | sigmoid |" in (tmp_path / "summary.md").read_text()

    assert results["environment"]["bnjax_commit"]  # this test runs inside a git checkout

    capsys.readouterr()
    written = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in tmp_path.iterdir()}
    article.main(argv)  # everything is saved: nothing retrains, nothing is rewritten
    output = capsys.readouterr().out
    assert "6 already in" in output and "0 to train" in output
    assert "Nothing was trained" in output and "This machine differs" not in output  # made right here
    assert "| 0.01 | sigmoid |" in output  # the summary table, shown
    assert ("python -m experiments.article --seeds 1 --max-steps 20 --no-precise-bn "
            "--out runs/article-seeds-1-max-steps-20-no-precise-bn") in output
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in tmp_path.iterdir()} == written


def test_committed_results_explain_where_they_came_from_and_stay_untouched(tmp_path, capsys):
    # A fresh clone's main job: the committed article results, another machine's.
    committed = Path(__file__).resolve().parents[1] / "outputs" / "article"
    for name in ("results.json", "summary.md"):
        shutil.copy(committed / name, tmp_path / name)
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["environment"]["cpu"] = "some other CPU"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    article.main(["--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert "0 to train" in output and "Nothing was trained. The saved runs were made on: some other CPU" in output
    assert "This machine differs" in output
    assert "python -m experiments.article --out runs/article-afresh" in output
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == written  # no figure drawn either


def test_the_main_job_on_a_fresh_clone_reports_the_committed_runs_and_writes_nothing_there(tmp_path, monkeypatch,
                                                                                           capsys):
    committed = Path(__file__).resolve().parents[1] / "outputs" / "article"
    (tmp_path / "outputs" / "article").mkdir(parents=True)
    for name in ("results.json", "summary.md"):
        shutil.copy(committed / name, tmp_path / "outputs" / "article" / name)
    before = {path.name: path.read_bytes() for path in (tmp_path / "outputs" / "article").iterdir()}
    monkeypatch.chdir(tmp_path)
    article.main([])
    output = capsys.readouterr().out
    made_on = json.loads(before["results.json"])["environment"]["cpu"]
    assert "article: results go to runs/article/" in output and "18 already in runs/article/results.json" in output
    assert f"Nothing was trained. The saved runs were made on: {made_on}" in output
    assert "| 0.01 | sigmoid |" in output  # the committed summary table, shown
    # The time quoted is the README's: the runs' summed times over the runs trained at once.
    import re

    summed, at_once, about = re.search(r"add up to (\d+) minutes where they were made; (\d+) at a time, .*: "
                                       r"about (\d+) minutes\)", output).groups()
    assert int(at_once) == article.default_strategy("cpu").parallel_runs
    assert abs(int(about) - int(summed) / int(at_once)) <= 1
    assert {path.name: path.read_bytes() for path in (tmp_path / "outputs" / "article").iterdir()} == before


def test_bad_cli_values_get_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        article.parse_args(["--seeds", "0"])
    error = capsys.readouterr().err
    assert error.startswith("error: argument --seeds: expected a positive integer, got '0'")
    assert len(error.strip().splitlines()) == 1 and "usage:" not in error


def test_saved_configs_missing_a_newer_field_still_match():
    from bnjax.training.config import TrainConfig
    from experiments.results import run_key

    config = TrainConfig(seed=2).to_dict()
    older = {key: value for key, value in config.items() if key != "eval_batch_size"}  # as if saved before it existed
    assert run_key(older) == run_key(config)
    assert run_key({**config, "seed": 3}) != run_key(config)
