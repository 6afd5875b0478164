"""Checkpoints: a restored model predicts identically; an interrupted run
resumes to the same History as an uninterrupted one."""

import dataclasses

import jax
import numpy as np
import pytest

from bnjax.training.checkpoint import restore_checkpoint
from bnjax.training.config import TrainConfig
from bnjax.training.steps import create_train_state
from bnjax.training.train import train

CONFIG = TrainConfig(batch_norm=True, activation="sigmoid", batch_size=32, epochs=3, eval_every=4, shuffle=True)
CURVES = ("steps", "val_accuracy", "val_loss", "train_accuracy", "train_loss")


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_history(tiny_data, tmp_path):
    uninterrupted, final_state = train(CONFIG, tiny_data)  # 8 steps per epoch, 24 steps

    path = tmp_path / "run.msgpack"

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
    path = tmp_path / "run.msgpack"
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
    path = tmp_path / "run.msgpack"
    train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)
    with pytest.raises(ValueError, match="is from another config \\(learning_rate: saved 0.001 vs 0.01"):
        train(dataclasses.replace(CONFIG, max_steps=4, learning_rate=0.01), tiny_data, checkpoint_path=path)


def test_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    path = tmp_path / "run.msgpack"
    train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="is unreadable"):
        train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)


def test_a_checkpoint_garbled_in_the_middle_is_refused(tiny_data, tmp_path):
    # Bytes overwritten, not cut: msgpack alone parsed such a file into other
    # weights and the run resumed from them.
    path = tmp_path / "run.msgpack"
    train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its content does not match the SHA-256 saved with it"):
        train(dataclasses.replace(CONFIG, max_steps=4), tiny_data, checkpoint_path=path)


def test_a_checkpoint_without_a_checksum_is_refused(tmp_path):
    from flax import serialization

    path = tmp_path / "old.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"config": {}, "state": {}, "history": {}}))
    with pytest.raises(ValueError, match="is not a bnjax-checkpoint-2 file .*carry no checksum"):
        restore_checkpoint(path, None, CONFIG)
