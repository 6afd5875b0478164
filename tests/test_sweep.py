"""The one sweep driver of experiments/: resumable, measured, with progress."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bnjax.engine.strategy import Strategy
from bnjax.support import xla_flags
from bnjax.training.config import TrainConfig
from bnjax.training.history import History
from experiments import paper_mnist, sweep

CONFIGS = [TrainConfig(batch_norm=True, activation="sigmoid", max_steps=4, eval_every=2, eval_batch_size=32,
                       seed=seed) for seed in (0, 1)]


def first_running_mean(config, data):
    return lambda state: {"mean0": float(state.batch_stats["BatchNorm_0"]["mean"][0])}


@pytest.mark.slow
def test_a_sweep_saves_each_run_with_its_probes_and_measurements_and_resumes(tiny_data, tmp_path, capsys):
    path = tmp_path / "results.json"
    measure = lambda config, history, state, data: {"final_step": int(state.step)}  # noqa: E731
    sweep.run_sweep(CONFIGS, path, lambda: tiny_data, strategy=Strategy(models_per_program=2),
                    make_probe=first_running_mean, measure=measure, name="study")
    output = capsys.readouterr().out
    assert "study: 2 runs; 0 already in" in output and "2 to train" in output
    assert "study [1/2] seed=0 step 2/4" in output and "| ETA" in output
    runs = json.loads(path.read_text())["runs"]
    assert [run["config"]["seed"] for run in runs] == [0, 1]
    assert all(run["final_step"] == 4 and len(run["probes"]) == 2 == len(run["steps"]) for run in runs)
    assert runs[0]["probes"] != runs[1]["probes"]

    def no_data():
        raise AssertionError("nothing is left to train: the data set must not be loaded")

    more = [*CONFIGS, dataclasses.replace(CONFIGS[0], seed=2)]
    sweep.run_sweep(CONFIGS, path, no_data, name="study")
    assert "2 already in" in capsys.readouterr().out
    results = sweep.run_sweep(more, path, lambda: tiny_data, strategy=Strategy(), name="study")
    assert "1 to train" in capsys.readouterr().out
    assert [run["config"]["seed"] for run in results["runs"]] == [0, 1, 2]


def test_a_study_run_as_main_hands_workers_its_functions_by_module_name(monkeypatch):
    as_main = types.SimpleNamespace(__spec__=types.SimpleNamespace(name="experiments.paper_mnist"))
    monkeypatch.setitem(__import__("sys").modules, "__main__", as_main)
    defined_in_main = types.FunctionType(paper_mnist.sigmoid_input_percentiles.__code__, {},
                                         "sigmoid_input_percentiles")
    defined_in_main.__module__, defined_in_main.__qualname__ = "__main__", "sigmoid_input_percentiles"
    assert sweep.importable(defined_in_main) is paper_mnist.sigmoid_input_percentiles
    assert sweep.importable(first_running_mean) is first_running_mean  # already importable
    assert sweep.importable(None) is None


def test_common_flags_refuse_bad_values_in_one_line(capsys):
    parser = argparse.ArgumentParser()
    sweep.add_sweep_flags(parser, seeds=3, epochs=1, study="x")
    args = parser.parse_args([])
    assert (args.seeds, args.epochs, args.max_steps, args.out, args.parallel_runs) == (3, 1, None, None, None)
    assert sweep.sweep_strategy(args) is None
    assert sweep.sweep_strategy(parser.parse_args(["--parallel-runs", "1"])).parallel_runs == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "0"])
    assert "argument --seeds: expected a positive integer, got '0'" in capsys.readouterr().err


def test_a_study_without_out_writes_into_runs_and_copies_only_the_committed_runs_it_asks_for(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    sweep.add_sweep_flags(parser, seeds=1, epochs=None, study="demo")
    args = parser.parse_args([])
    assert sweep.output_folder(args, "demo") == args.out == Path("runs/demo")
    assert "demo: results go to runs/demo/ (runs already in outputs/demo/ are copied from there" in capsys.readouterr().out
    assert sweep.output_folder(parser.parse_args(["--out", "outputs/demo"]), "demo") == Path("outputs/demo")
    committed = {"environment": {"cpu": "the committing machine"},
                 "runs": [{"config": config.to_dict(), **History(steps=[4], val_accuracy=[0.5], val_loss=[1.0],
                                                                  train_accuracy=[0.5], train_loss=[1.0],
                                                                  wall_time_s=[1.0]).to_dict()}
                          for config in CONFIGS]}
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "results.json").write_text(json.dumps(committed))
    before = (tmp_path / "outputs" / "demo" / "results.json").read_bytes()
    results = {"runs": []}
    assert sweep.copy_committed_runs(results, Path("runs/demo/results.json"), CONFIGS[:1]) == 1
    saved = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    assert [run["config"] for run in saved["runs"]] == [CONFIGS[0].to_dict()]  # only what was asked for
    assert saved["runs"][0]["copied_from"] == {"file": "outputs/demo/results.json",
                                               "environment": {"cpu": "the committing machine"}}
    assert sweep.copy_committed_runs(results, Path("runs/demo/results.json"), CONFIGS[:1]) == 0  # not twice
    assert sweep.copy_committed_runs({"runs": []}, tmp_path / "elsewhere.json", CONFIGS) == 0  # not under runs/
    assert (tmp_path / "outputs" / "demo" / "results.json").read_bytes() == before


def test_an_out_folder_that_is_a_file_is_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    path = tmp_path / "out" / "results.json"

    def no_data():
        raise AssertionError("the results cannot be saved: nothing may be trained")

    with pytest.raises(SystemExit) as exit_info:
        sweep.run_sweep(CONFIGS, path, no_data, name="study")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot save results to {path}: {tmp_path / 'out'} is a file, "
                                       "not a folder (choose another --out)\n")


def test_an_interrupted_study_ends_in_one_line_with_the_shells_code_for_ctrl_c(capsys):
    from experiments.results import run_resumable

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_resumable(interrupted)
    assert exit_info.value.code == 130  # as `python -m bnjax` ends on Ctrl-C
    assert capsys.readouterr().err == "interrupted; finished runs are saved and will be skipped next time\n"


@pytest.mark.slow
def test_a_resumed_sweep_trains_its_remaining_runs_as_the_uninterrupted_sweep_did(tiny_data, tmp_path, monkeypatch):
    # Three runs of one architecture, two per program, programs in worker
    # processes: groups [0, 1] and [2]. The sweep is "interrupted" after run 0
    # was saved (runs 1 and 2 lost). Resumed, the group [0, 1] trains whole
    # again (run 1 is saved), [2] alone, both in workers, as before.
    from bnjax.engine import launch as engine

    configs = [TrainConfig(batch_norm=True, shuffle=True, max_steps=6, eval_every=3, eval_batch_size=32, seed=seed)
               for seed in range(3)]
    strategy = Strategy(models_per_program=2, parallel_runs=2)
    layouts, in_workers = [], engine._run_groups_in_workers
    monkeypatch.setattr(engine, "_run_groups_in_workers",
                        lambda groups, *args: layouts.append(sorted(groups)) or in_workers(groups, *args))
    uninterrupted = tmp_path / "uninterrupted.json"
    full = sweep.run_sweep(configs, uninterrupted, lambda: tiny_data, strategy=strategy)
    resumed_path = tmp_path / "resumed.json"
    kept = [run for run in full["runs"] if run["config"]["seed"] == 0]
    resumed_path.write_text(json.dumps({"environment": {}, "runs": kept}))
    resumed = sweep.run_sweep(configs, resumed_path, lambda: tiny_data, strategy=strategy)

    assert layouts == [[[0, 1], [2]], [[0, 1], [2]]]
    assert sorted(run["config"]["seed"] for run in resumed["runs"]) == [0, 1, 2]  # run 0 saved once
    timing = ("wall_time_s", "total_wall_time_s", "eval_time_s", "eval_statistics_time_s")
    by_seed = lambda runs: {run["config"]["seed"]: {k: v for k, v in run.items() if k not in timing}  # noqa: E731
                            for run in runs}
    assert by_seed(resumed["runs"]) == by_seed(full["runs"])  # bit for bit


def test_distributed_joins_the_processes_before_the_sweep_starts(monkeypatch):
    joined = []
    monkeypatch.setattr(sweep.jax.distributed, "initialize", lambda: joined.append(True))
    parser = argparse.ArgumentParser()
    sweep.add_sweep_flags(parser, seeds=1, epochs=1, study="x")
    assert sweep.sweep_strategy(parser.parse_args([])) is None and joined == []
    sweep.sweep_strategy(parser.parse_args(["--distributed"]))
    assert joined == [True]


@pytest.mark.slow
def test_a_study_run_without_out_leaves_the_committed_results_as_they_were(tiny_data, tmp_path, monkeypatch,
                                                                         capsys):
    # The BN paper's figure at 4 steps: other settings than the committed runs'.
    committed = Path(__file__).resolve().parents[1] / "outputs" / "paper_mnist"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "paper_mnist").mkdir(parents=True)
    for source in committed.iterdir():
        (tmp_path / "outputs" / "paper_mnist" / source.name).write_bytes(source.read_bytes())
    before = {path.name: path.read_bytes() for path in (tmp_path / "outputs" / "paper_mnist").iterdir()}
    monkeypatch.setattr(paper_mnist, "load_mnist", lambda: tiny_data)
    paper_mnist.main(["--steps", "4", "--eval-every", "2", "--seeds", "1", "--parallel-runs", "1"])
    assert {path.name: path.read_bytes() for path in (tmp_path / "outputs" / "paper_mnist").iterdir()} == before
    runs = json.loads((tmp_path / "runs" / "paper_mnist" / "results.json").read_text())["runs"]
    assert [run["steps"] for run in runs] == [[2, 4], [2, 4]]  # only this invocation's runs
    assert (tmp_path / "runs" / "paper_mnist" / "paper_mnist.png").exists()
    assert "wrote runs/paper_mnist/paper_mnist.png" in capsys.readouterr().out


@pytest.mark.slow
def test_a_study_with_checkpoints_resumes_its_runs_mid_run(tiny_data, tmp_path, monkeypatch):
    # The BN paper's figure on the tiny data set (4 steps a run), one seed:
    # stopped at step 2 of its first run (as a Colab runtime disconnects), run
    # again, it goes on from step 2 to what an uninterrupted study gives.
    monkeypatch.setattr(paper_mnist, "load_mnist", lambda: tiny_data)
    flags = ["--steps", "8", "--eval-every", "2", "--seeds", "1", "--parallel-runs", "1"]
    paper_mnist.main([*flags, "--out", str(tmp_path / "whole")])
    seen = []
    real_on_eval = sweep.SweepObserver.on_eval

    def stop_at_step_2(self, config, step, total_steps, record):
        seen.append(step)
        real_on_eval(self, config, step, total_steps, record)
        if step == 2 and not (tmp_path / "part" / "results.json").exists():
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep.SweepObserver, "on_eval", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        paper_mnist.main([*flags, "--out", str(tmp_path / "part"), "--checkpoint"])
    assert len(list((tmp_path / "part" / "checkpoints").iterdir())) == 1  # the run in progress
    seen.clear()
    paper_mnist.main([*flags, "--out", str(tmp_path / "part"), "--checkpoint"])
    assert seen[0] == 4  # resumed after step 2, not trained from step 0
    assert list((tmp_path / "part" / "checkpoints").iterdir()) == []  # each run's checkpoint gone once it is saved

    def curves(folder):
        runs = json.loads((tmp_path / folder / "results.json").read_text())["runs"]
        return [{key: run[key] for key in ("config", "steps", "val_accuracy", "train_loss", "probes")} for run in runs]

    assert curves("part") == curves("whole")


def test_progress_names_each_kind_of_bn_statistics():
    record = {"val_accuracy": 0.113, "precise_val_accuracy": 0.9454, "train_loss": 0.3245}
    assert sweep.progress_numbers(record) == ("val_accuracy 0.1130 (running averages) precise_val_accuracy 0.9454 "
                                              "train_loss 0.3245")
    assert sweep.progress_numbers({"val_accuracy": 0.5, "train_loss": 1.0}) == \
        "val_accuracy 0.5000 (running averages) train_loss 1.0000"


@pytest.mark.slow
def test_a_sweeps_runs_replayed_give_their_histories_bit_for_bit(tmp_path):
    # Two programs of two stacked runs, in two worker processes of one core
    # each: replayed one by one in a fresh process launched as its worker was.
    configs = [dataclasses.replace(config, model="mlp", seed=seed, learning_rate=lr)
               for config in CONFIGS[:1] for lr in (0.001, 0.003) for seed in (0, 1)]
    path = tmp_path / "results.json"
    strategy = Strategy(steps_per_dispatch=2, models_per_program=2, parallel_runs=2)
    sweep.run_sweep(configs, path, make_dataset_for_sweep, strategy=strategy, name="replay")
    runs = json.loads(path.read_text())["runs"]
    assert {run["launch"]["cpu_cores"] for run in runs} == {1} and {len(run["launch"]["program"]) for run in runs} == {2}
    script = Path(__file__).resolve().parent / "replay_run.py"
    for index in (0, 3):
        result = subprocess.run([sys.executable, str(script), str(path), str(index)], capture_output=True, text=True,
                                timeout=300, cwd=script.parent, env=xla_flags.for_subprocess(os.environ))
        assert result.returncode == 0, result.stderr[-2000:]
        replayed = json.loads(result.stdout.strip().splitlines()[-1])
        for curve in ("steps", "val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            assert replayed[curve] == runs[index][curve], (index, curve)


def make_dataset_for_sweep():
    from conftest import make_dataset

    return make_dataset()


def test_the_eta_learns_from_the_steps_done_after_compiling():
    eta = sweep.Eta(total_steps=1000)
    assert eta.update(100, now=60.0) == "ETA: measuring"  # the first report: a minute of compiling behind it
    assert eta.update(300, now=80.0) == "ETA 1.2 min"  # 200 steps in 20 s: 700 left at 10 steps/s
    assert eta.update(500, now=100.0) == "ETA 0.8 min"


def test_a_studys_bad_argument_ends_in_one_line_naming_the_program():
    result = subprocess.run([sys.executable, "-m", "experiments.article", "--seeds", "0"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr == ("error: argument --seeds: expected a positive integer, got '0' "
                             "(python -m experiments.article --help lists the options)\n")
