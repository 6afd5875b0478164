"""TensorBoard event files of a run, written through tensorboardX, read back
here record by record (TFRecord framing, Event protos): the scalars are the
History's, every kind of BN statistics its own line, the config the
hyperparameters; from the Python API, the command line and the studies."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

import bnjax
import bnjax.__main__ as cli
from bnjax.engine.strategy import Strategy
from bnjax.training.config import TrainConfig
from bnjax.training.train import train
from conftest import make_dataset
from experiments.sweep import run_sweep

CONFIG = TrainConfig(batch_norm=True, model="mlp", max_steps=6, eval_every=3, eval_batch_size=32,
                     eval_statistics="precise", precise_bn_batches=2, bn=bnjax.keras_bn(momentum=0.9))


def read_events(folder: Path) -> tuple[dict, dict]:
    """({tag: [(step, value)]}, hyperparameters) from the event files in `folder`."""
    scalars, hparams = {}, {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    content = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for name, given in content.session_start_info.hparams.items():
                        hparams[name] = given.WhichOneof("kind") and getattr(given, given.WhichOneof("kind"))
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, hparams


def assert_curves_are_the_historys(scalars: dict, history) -> None:
    for field, tag in (("val_accuracy", "accuracy/test_running"), ("precise_val_accuracy", "accuracy/test_precise"),
                       ("train_loss", "loss/train"), ("val_loss", "loss/test_running")):
        steps, values = zip(*scalars[tag])
        assert list(steps) == history.steps
        np.testing.assert_array_equal(values, np.float32(getattr(history, field)))  # stored as float32


@pytest.fixture(scope="module")
def trained():
    return train(CONFIG, make_dataset())


def test_a_history_written_reads_back_as_its_curves_and_config(trained, tmp_path):
    history, _ = trained
    bnjax.write_tensorboard(tmp_path / "run", CONFIG, history)
    scalars, hparams = read_events(tmp_path / "run")
    assert_curves_are_the_historys(scalars, history)
    assert "accuracy/test_batch" not in scalars  # not measured by this run
    assert hparams["batch_norm"] is True and hparams["bn.momentum"] == pytest.approx(0.9)
    assert hparams["bn.epsilon"] == pytest.approx(1e-3) and hparams["model"] == "mlp"
    assert hparams["max_steps"] == 6 and hparams["steps_per_epoch"] == "None"


def test_a_live_log_as_trains_on_eval_writes_the_same(trained, tmp_path):
    log = bnjax.TensorBoardLog(tmp_path / "live", CONFIG)
    history, _ = train(CONFIG, make_dataset(), on_eval=log.on_eval)
    log.close(history)
    assert_curves_are_the_historys(read_events(tmp_path / "live")[0], history)


@pytest.mark.slow
def test_the_command_line_writes_its_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_dataset", lambda *args: make_dataset())
    saved = tmp_path / "run.json"
    cli.main(["--set", "batch_norm=true", "--set", "model=mlp", "--set", "max_steps=4", "--set", "eval_every=2",
              "--set", "eval_batch_size=32", "--save", str(saved), "--tensorboard", str(tmp_path / "tb")])
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'tb'}" in capsys.readouterr().out
    scalars, hparams = read_events(tmp_path / "tb")
    assert [step for step, _ in scalars["accuracy/test_running"]] == [2, 4] and hparams["batch_norm"] is True


@pytest.mark.slow
def test_a_study_writes_one_folder_per_run(tmp_path):
    configs = [TrainConfig(model="mlp", max_steps=2, eval_every=2, eval_batch_size=32, seed=seed) for seed in (0, 1)]
    run_sweep(configs, tmp_path / "results.json", make_dataset, strategy=Strategy(parallel_runs=1),
              tensorboard_dir=tmp_path / "tb")
    assert sorted(path.name for path in (tmp_path / "tb").iterdir()) == ["seed=0", "seed=1"]
    assert [step for step, _ in read_events(tmp_path / "tb" / "seed=1")[0]["accuracy/train"]] == [2]


def test_without_tensorboardx_a_log_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ValueError, match=r"^TensorBoard logs are written with tensorboardX, which is not installed: "
                                         r"pip install tensorboardX"):
        bnjax.TensorBoardLog(tmp_path, CONFIG)
