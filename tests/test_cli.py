"""`python -m bnjax`: one run from the command line, any TrainConfig field by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bnjax
import bnjax.__main__ as cli
from bnjax.training.history import History
from conftest import make_dataset


@pytest.mark.slow
def test_a_short_run_prints_progress_and_saves_its_history(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())
    saved = tmp_path / "run.json"
    cli.main(["--set", "batch_norm=true", "--set", "learning_rate=0.01", "--set", "max_steps=6",
              "--set", "eval_every=3", "--set", "eval_batch_size=32", "--set", "num_devices=none",
              "--set", "eval_statistics=precise", "--set", "precise_bn_batches=2", "--save", str(saved)])
    output = capsys.readouterr().out
    assert "'batch_norm': True" in output and "'learning_rate': 0.01" in output
    assert "compiling, then training; a line every 3 steps" in output
    assert "step 3/6 val_accuracy" in output and "step 6/6 val_accuracy" in output
    assert "done: final test accuracy" in output
    assert "step 6/6 val_accuracy" in output and " precise_val_accuracy " in output
    assert "the same weights with precise BN statistics: test accuracy" in output
    result = json.loads(saved.read_text())
    assert result["config"]["batch_norm"] is True and result["config"]["learning_rate"] == 0.01
    assert result["steps"] == [3, 6] and len(result["val_accuracy"]) == 2 == len(result["precise_val_accuracy"])
    assert {"jax", "flax", "bnjax_commit"} <= set(result["environment"])
    assert result["precision"] == "float32 arrays; products: float32"  # what this CPU computed


@pytest.mark.parametrize("setting, message", [
    ("batchnorm=true", "error: unknown TrainConfig field 'batchnorm'; did you mean batch_norm? "
                       "python -m bnjax --fields lists them"),
    ("no_such_thing=1", "error: unknown TrainConfig field 'no_such_thing'; python -m bnjax --fields lists them"),
    ("batch_norm=maybe", "error: batch_norm must be true or false, got 'maybe'"),
    ("max_steps=ten", "error: max_steps must be an integer or none, got 'ten'"),
    ("learning_rate=-1", "error: learning_rate must be a positive finite number, got -1.0"),
    ("activation=swish", "error: unknown activation 'swish'; allowed: elu, gelu, relu, sigmoid, tanh"),
    ("seed", "error: --set needs FIELD=VALUE, got 'seed'"),
    ("eval_statistics=population", "error: unknown eval_statistics 'population'; allowed: batch, precise, running"),
    ("seed=4294967296", "error: seed must be an integer from 0 to 4294967295"),
])
def test_bad_input_ends_with_one_line_naming_it(setting, message):
    # A real process: the user sees exactly this, and no traceback.
    result = subprocess.run([sys.executable, "-m", "bnjax", "--set", setting], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_fields_lists_every_field_with_its_default(capsys):
    cli.main(["--fields"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cli.SETTING_TYPES) + 1 and lines[0].split() == ["field", "default", "takes"]
    assert any(line.split()[:2] == ["bn.momentum", "0.99"] for line in lines)
    assert any(line.split()[:2] == ["bn.renorm.r_max", "3.0"] for line in lines)
    assert any(line.split()[:2] == ["bn.layer", "'BatchNorm'"] and line.endswith("one of BatchNorm, NoisyBatchNorm, LpBatchNorm")
               for line in lines)
    assert any(line.split()[:3] == ["activation", "'relu'", "one"] and line.endswith("one of elu, gelu, relu, sigmoid, tanh")
               for line in lines)
    assert any(line.split()[0] == "max_steps" and line.endswith("an integer or none") for line in lines)
    assert len({line.index(line.split()[1]) for line in lines[1:]}) == 1  # one column of defaults, however long the name


@pytest.mark.parametrize("where, message", [
    ("folder", "is a folder; give a file path"),
    ("under-a-file", "is a file, not a folder"),
    ("unmakeable", "cannot create the folder /proc/bnjax-nope"),
])
def test_an_unwritable_save_path_is_refused_before_any_training(tmp_path, monkeypatch, capsys, where, message):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: pytest.fail("work started"))
    (tmp_path / "a-file").write_text("")
    path = {"folder": tmp_path, "under-a-file": tmp_path / "a-file" / "run.json",
            "unmakeable": Path("/proc/bnjax-nope/run.json")}[where]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--set", "max_steps=2", "--save", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --save {path} ") and message in error and len(error.strip().splitlines()) == 1
    if where == "folder":  # a checkpoint is a folder (orbax's): an existing one is where it goes
        return
    with pytest.raises(SystemExit):  # --checkpoint too
        cli.main(["--set", "max_steps=2", "--checkpoint", str(path)])
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {path} ")


def test_a_diverged_run_exits_3_and_still_saves_its_history(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())
    saved = tmp_path / "run.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--set", "learning_rate=1000", "--set", "max_steps=20", "--set", "eval_every=5",
                  "--set", "batch_size=16", "--set", "num_devices=none", "--save", str(saved)])
    assert exit_info.value.code == 3
    captured = capsys.readouterr()
    assert "diverged (training loss " in captured.out and "done:" not in captured.out
    assert captured.err.startswith("the run diverged: its training loss is NaN, infinite or above 230")
    assert json.loads(saved.read_text())["diverged"] is True


def test_ctrl_c_ends_a_run_in_one_line_with_the_shells_code(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnjax, "train_many", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--set", "max_steps=2"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted; nothing saved\n"


RECORD = {"val_accuracy": 0.1135, "train_accuracy": 0.8459, "train_loss": 0.82, "val_loss": 2.3}


def test_a_bn_runs_lagging_test_accuracy_is_explained_once(monkeypatch, capsys):
    def two_evaluations(configs, data, observer):
        for step in (100, 200):
            observer.on_eval(configs[0], step, 200, RECORD)
        return [(History(steps=[100, 200], val_accuracy=[0.1135] * 2, train_loss=[0.8] * 2), None)]

    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())
    monkeypatch.setattr(bnjax, "train_many", two_evaluations)
    cli.main(["--set", "batch_norm=true", "--set", "max_steps=200"])
    output = capsys.readouterr().out
    assert output.count("note: test accuracy 0.1135 against 0.8459 in training: in eval mode BN uses its "
                        "running averages") == 1
    assert "by 0.99**100 = 0.37;" in output and "--set eval_statistics=precise" in output


@pytest.mark.parametrize("changes, explained", [
    ({}, True),
    ({"batch_norm": False}, False),  # no running averages
    ({"eval_statistics": "precise"}, False),  # precise BN is shown beside them already
    ({"bn": cli.keras_bn(running_average="cumulative")}, True),
])
def test_which_runs_get_the_note(changes, explained):
    config = cli.TrainConfig(**{"batch_norm": True, **changes})
    note = cli.running_average_lag_note(config, 100, RECORD)
    assert (note is not None) == explained
    if note and config.bn_layer().running_average != "ema":
        assert "initial values" not in note  # the 0.99**t weight is the EMA's
    assert cli.running_average_lag_note(config, 100, {**RECORD, "val_accuracy": 0.7}) is None  # a small gap


@pytest.mark.slow
def test_a_run_with_checkpoint_resumes_after_ctrl_c_to_the_uninterrupted_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())
    settings = ["--set", "model=mlp", "--set", "batch_norm=true", "--set", "max_steps=8", "--set", "eval_every=2",
                "--set", "eval_batch_size=32"]
    uninterrupted, resumed = tmp_path / "whole.json", tmp_path / "resumed.json"
    cli.main([*settings, "--save", str(uninterrupted)])
    real_printer = cli._progress_printer

    def stop_at_step_4(config):
        show = real_printer(config)

        def stop(config, step, total, record):
            show(config, step, total, record)
            if step == 4:
                raise KeyboardInterrupt
        return stop

    monkeypatch.setattr(cli, "_progress_printer", stop_at_step_4)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*settings, "--checkpoint", str(checkpoint)])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted; resume with the same command\n"
    monkeypatch.setattr(cli, "_progress_printer", real_printer)
    cli.main([*settings, "--checkpoint", str(checkpoint), "--save", str(resumed)])
    printed = capsys.readouterr().out
    assert f"resuming {checkpoint} from step 4\n" in printed and "step 6/8" in printed
    whole, after = json.loads(uninterrupted.read_text()), json.loads(resumed.read_text())
    for curve in ("steps", "val_loss", "val_accuracy", "train_loss", "train_accuracy"):
        assert after[curve] == whole[curve], curve


def test_a_config_a_sweep_trained_gets_one_line_on_how_to_get_the_sweeps_numbers(tmp_path, monkeypatch):
    import dataclasses

    from bnjax.training.config import TrainConfig

    config = TrainConfig(batch_norm=True, max_steps=7)
    launch = {"loop": "engine", "cpu_cores": 1, "program": [[0, 0.001]]}
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "results.json").write_text(json.dumps(
        {"runs": [{"config": TrainConfig().to_dict()},
                  {"config": config.to_dict(), "launch": launch}]}))
    monkeypatch.chdir(tmp_path)
    assert cli.saved_twin_note(config) == (
        "note: outputs/demo/results.json run 1 is this config, trained by a sweep (1 CPU core(s), 1 run(s) in its "
        "program): this run's float round-off can differ; python -m bnjax --replay outputs/demo/results.json "
        "--run 1 gives its numbers")
    assert cli.saved_twin_note(dataclasses.replace(config, seed=1)) is None


def test_a_ctrl_c_inside_a_gc_callback_waits_for_the_next_check(monkeypatch):
    # Raised there, Python would print "Exception ignored in ..." and drop it (seen once, at 2.5 s).
    import gc
    import signal

    monkeypatch.setattr(cli.CtrlC, "pressed", False)
    monkeypatch.setattr(cli.CtrlC, "armed", True)
    outcomes = []

    def a_gc_callback(phase, info):
        try:
            cli.CtrlC.handle(signal.SIGINT, sys._getframe())
            outcomes.append("deferred")
        except KeyboardInterrupt:
            outcomes.append("raised")

    class Finalized:
        def __del__(self):
            a_gc_callback("stop", {})

    monkeypatch.setattr(gc, "callbacks", [a_gc_callback])
    a_gc_callback("start", {})
    monkeypatch.setattr(gc, "callbacks", [])
    finalized = Finalized()
    del finalized  # its __del__ runs here
    a_gc_callback("start", {})  # an ordinary function now: raised at once
    assert outcomes == ["deferred", "deferred", "raised"]
    with pytest.raises(KeyboardInterrupt):
        cli.CtrlC.check()


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_ends_the_program_in_one_line(mnist, delay):
    # While Python imports, while JAX starts, while it trains: the same one line, the shell's code.
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "bnjax", "--set", "max_steps=5000", "--set", "eval_every=50"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert [line for line in err.splitlines() if not line.startswith("bnjax.data")] == ["interrupted; nothing saved"]
    assert "done:" not in out


def test_the_readmes_replay_example_names_a_committed_run_with_a_launch_record():
    # On a fresh clone: the file is committed, and its run carries what a replay needs.
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path, run = re.search(r"python -m bnjax --replay (\S+) --run (\d+)", (root / "README.md").read_text()).groups()
    saved = json.loads((root / path).read_text())["runs"][int(run)]
    assert {"loop", "cpu_cores", "xla_flags", "strategy", "program", "index_in_program"} <= set(saved["launch"])


def test_bn_settings_are_set_one_by_one_and_the_flat_names_point_to_them():
    config = cli.config_from_settings(["batch_norm=true", "bn.momentum=0.9", "bn.ghost_batch_size=8"])
    assert config.bn == cli.keras_bn(momentum=0.9, ghost_batch_size=8)
    assert cli.changed_settings(config) == {"batch_norm": True, "bn.momentum": 0.9, "bn.ghost_batch_size": 8}
    noisy = cli.config_from_settings(["batch_norm=true", "bn.layer=NoisyBatchNorm", "bn.noise_shift=0.5"])
    assert type(noisy.bn).__name__ == "NoisyBatchNorm" and noisy.bn.noise_shift == 0.5
    for old, new in (("bn_momentum", "bn.momentum"), ("bn_renorm_r_max", "bn.renorm.r_max"),
                     ("bn_noise", "bn.layer=NoisyBatchNorm"), ("bn_two_pass_variance", "bn.use_fast_variance")):
        with pytest.raises(ValueError, match=rf"^unknown TrainConfig field {old!r}; BN's settings are set as {new}"):
            cli.config_from_settings([f"{old}=1"])
    with pytest.raises(ValueError, match=r"^bn \(NoisyBatchNorm\) has no setting 'foo'|^unknown TrainConfig field 'bn.foo'"):
        cli.config_from_settings(["bn.foo=1"])


def test_a_bn_setting_on_a_run_without_bn_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--set", "bn.renorm=true", "--set", "max_steps=1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1
    assert error.startswith("error: bn=BatchNorm(") and "this run has no BN (batch_norm=False)" in error
