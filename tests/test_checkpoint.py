"""Checkpoints: orbax folders a Flax user restores with orbax alone; a
restored model predicts identically; an interrupted run resumes to the same
History as an uninterrupted one; another config's or a damaged checkpoint is
refused; the msgpack files of earlier bnjax are still read."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bnjax.training.checkpoint import restore_checkpoint
from bnjax.training.config import TrainConfig
from bnjax.training.steps import create_train_state
from bnjax.training.train import train
from conftest import make_dataset

FIXTURES = Path(__file__).parent / "fixtures"

CONFIG = TrainConfig(batch_norm=True, activation="sigmoid", batch_size=32, epochs=3, eval_every=4, shuffle=True)
CURVES = ("steps", "val_accuracy", "val_loss", "train_accuracy", "train_loss")


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_history(tiny_data, tmp_path):
    uninterrupted, final_state = train(CONFIG, tiny_data)  # 8 steps per epoch, 24 steps

    path = tmp_path / "run.ckpt"

    def stop_at_step_12(config, step, total_steps, record):
        if step == 12:  # mid-epoch (epoch 2 starts at step 8), right after the checkpoint
            raise Interrupt

    with pytest.raises(Interrupt):
        train(CONFIG, tiny_data, on_eval=stop_at_step_12, checkpoint_path=path)
    resumed, resumed_state = train(CONFIG, tiny_data, checkpoint_path=path)

    for curve in CURVES:
        assert getattr(resumed, curve) == getattr(uninterrupted, curve), curve
    assert int(resumed_state.step) == 24
    for a, b in zip(jax.tree_util.tree_leaves(resumed_state.params), jax.tree_util.tree_leaves(final_state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_restored_model_predicts_identically(tiny_data, tmp_path):
    path = tmp_path / "run.ckpt"
    _, state = train(dataclasses.replace(CONFIG, max_steps=8), tiny_data, checkpoint_path=path)
    template = create_train_state(CONFIG, jax.random.key(123))  # other values, same structure
    restored, history = restore_checkpoint(path, template, dataclasses.replace(CONFIG, max_steps=8))
    assert history["steps"] == [4, 8] and int(restored.step) == 8
    images = tiny_data.x_test.astype(np.float32) / 255.0
    logits = [s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, images, train=False) for s in (state, restored)]
    np.testing.assert_array_equal(logits[0], logits[1])
    for name in ("opt_state", "batch_stats"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)), jax.tree_util.tree_leaves(getattr(restored, name))):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_config_is_refused(tiny_data, tmp_path):
    path = tmp_path / "run.ckpt"
    train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)
    with pytest.raises(ValueError, match="is from another config \\(learning_rate: saved 0.001 vs 0.01"):
        train(dataclasses.replace(CONFIG, max_steps=4, learning_rate=0.01), tiny_data, checkpoint_path=path)


def data_files(path: Path) -> list[Path]:
    """The files orbax wrote the arrays into, largest first."""
    return sorted((file for file in path.rglob("*") if file.is_file() and "/state/" in file.as_posix()
                   and file.parent.name == "d"), key=lambda file: -file.stat().st_size)


def test_a_flax_user_restores_it_with_orbax_alone(tiny_data, tmp_path):
    path = tmp_path / "run.ckpt"
    history, state = train(dataclasses.replace(CONFIG, max_steps=8), tiny_data, checkpoint_path=path)
    script = f"""
import json, sys
import numpy as np
import orbax.checkpoint as ocp
with ocp.CheckpointManager({str(path)!r}) as manager:
    saved = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), run=ocp.args.JsonRestore()))
assert not any(name.startswith("bnjax") for name in sys.modules)
print(json.dumps({{"step": int(saved["state"]["step"]), "kernel": np.asarray(saved["state"]["params"]["Conv_0"]["kernel"]).tolist(),
                  "mean": np.asarray(saved["state"]["batch_stats"]["BatchNorm_0"]["mean"]).tolist(),
                  "val_accuracy": saved["run"]["history"]["val_accuracy"], "config": saved["run"]["config"]}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(result.stdout.strip().splitlines()[-1])
    assert saved["step"] == 8 and saved["val_accuracy"] == history.val_accuracy
    np.testing.assert_array_equal(np.asarray(saved["kernel"], np.float32), state.params["Conv_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(saved["mean"], np.float32), state.batch_stats["BatchNorm_0"]["mean"])
    assert TrainConfig.from_dict(saved["config"]) == dataclasses.replace(CONFIG, max_steps=8)


def test_a_checkpoint_with_damaged_arrays_is_refused(tiny_data, tmp_path):
    # orbax keeps no checksum of its own: bytes changed in an array file can
    # decode into other numbers, which the SHA-256 bnjax saves refuses.
    config = dataclasses.replace(CONFIG, max_steps=4)
    path = tmp_path / "run.ckpt"
    train(config, tiny_data, checkpoint_path=path)
    template = create_train_state(config, jax.random.key(0))
    restore_checkpoint(path, template, config)
    for file in data_files(path)[:2]:
        content = bytearray(file.read_bytes())
        middle = len(content) // 2
        content[middle:middle + 16] = bytes(byte ^ 0xFF for byte in content[middle:middle + 16])
        file.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=rf"^checkpoint {path} is (damaged|unreadable)") as error:
        restore_checkpoint(path, template, config)
    assert len(str(error.value).splitlines()) == 1


def test_a_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    config = dataclasses.replace(CONFIG, max_steps=4)
    path = tmp_path / "run.ckpt"
    train(config, tiny_data, checkpoint_path=path)
    for file in data_files(path)[:1]:
        file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match="is (unreadable|damaged)"):
        train(config, tiny_data, checkpoint_path=path)


def test_a_checkpoint_file_of_earlier_bnjax_resumes_and_becomes_a_folder(tmp_path):
    # Written by tests/fixtures/make_flat_form_fixtures.py: a BN-LSTM saved at step 2 in the msgpack format.
    runs = json.loads((FIXTURES / "flat_form_results.json").read_text())["runs"]
    config = dataclasses.replace(TrainConfig.from_dict(runs[0]["config"]), max_steps=4)
    path = tmp_path / "run.msgpack"
    shutil.copy(FIXTURES / "flat_form_checkpoint.msgpack", path)
    with pytest.raises(ValueError, match="is from another config"):  # its config says max_steps=2
        train(config, make_dataset(), checkpoint_path=path)
    config = TrainConfig.from_dict(runs[0]["config"])
    history, state = train(config, make_dataset(), checkpoint_path=path)  # resumed at its last step: done
    assert int(state.step) == 2 and history.val_accuracy == runs[0]["val_accuracy"] and path.is_file()
    from bnjax.training.checkpoint import save_checkpoint

    save_checkpoint(path, state, history, config)  # saved again: the folder takes the file's place
    assert path.is_dir()
    restored, restored_history = restore_checkpoint(path, state, config)
    assert restored_history == history.to_dict() and int(restored.step) == 2


def test_a_checkpoint_without_a_checksum_is_refused(tmp_path):
    from flax import serialization

    path = tmp_path / "old.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"config": {}, "state": {}, "history": {}}))
    with pytest.raises(ValueError, match="is not a bnjax-checkpoint-2 file .*carry no checksum"):
        restore_checkpoint(path, None, CONFIG)
