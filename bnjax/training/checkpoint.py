"""Save and restore a whole training run: TrainState + History + config, as
an orbax checkpoint that a Flax user opens with orbax alone.

A checkpoint is a folder managed by orbax's `CheckpointManager`, holding the
last two saved steps, each a folder named by its step with two items:

    state   params, batch_stats, opt_state and step (the TrainState as
            flax.serialization's state dict), saved by orbax's StandardSave;
    run     JSON: the format's name, the config (`TrainConfig.to_dict()`),
            the History so far (`History.to_dict()`) and a SHA-256.

Restoring without bnjax:

    import orbax.checkpoint as ocp
    with ocp.CheckpointManager("runs/bn.ckpt") as manager:
        saved = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), run=ocp.args.JsonRestore()))
    saved["state"]["params"], saved["run"]["history"]["val_accuracy"]

(`manager.restore(step)` alone restores the same, with a warning per item.)

What bnjax promises of it:
  * atomic: orbax writes a step into a temporary folder and renames it
    when complete, and deletes older steps only after (the last two are
    kept): a process killed at any moment leaves the last complete step;
  * resumable: the PRNG needs no saving (the initialization comes from
    `config.seed`, each epoch's batch order from the seed and the epoch),
    so a resumed run reaches the History of an uninterrupted one;
  * checked: a checkpoint of another config is refused, naming the fields
    that differ; orbax keeps no checksum, so the SHA-256 in `run` covers
    every array's bytes and the JSON: a damaged checkpoint is refused in one
    line, or restores exactly what was saved, never other numbers;
  * saved by the calling process alone (orbax's `active_processes`), so the
    engine saves each run from the process that trains it.

The single msgpack file earlier bnjax wrote (format "bnjax-checkpoint-2") is
still read; the first save in its place replaces it with the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

FORMAT = "bnjax-checkpoint-3"  # an orbax folder: state + run (config, history, SHA-256)
MSGPACK_FORMAT = "bnjax-checkpoint-2"  # the single msgpack file, read only


def save_checkpoint(path: str | os.PathLike, state, history, config) -> None:
    """Save the run at `path` (a folder) as the checkpoint of its current
    step, atomically, replacing the previous one."""
    path = Path(path)
    if path.is_file():  # a checkpoint in the msgpack format: the folder takes its place
        path.unlink()
    state_dict = serialization.to_state_dict(jax.device_get(state))
    run = {"format": FORMAT, "config": config.to_dict(), "history": history.to_dict()}
    run["sha256"] = digest(state_dict, run)
    step = int(state_dict["step"])
    with _manager(path, create=True) as manager:
        if step in manager.all_steps():  # saved at this step before (a resumed run): replaced, not atomically
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                                   run=ocp.args.JsonSave(run)), force=True)


def restore_checkpoint(path: str | os.PathLike, template_state, config, step: int | None = None):
    """(state, history_dict) from `path` (its latest step, or `step`), into the
    structure of `template_state`.

    Raises ValueError if the checkpoint belongs to another config, naming the
    fields that differ, and if `path` is not a readable checkpoint."""
    payload = read_checkpoint(path, step)
    check_same_config(path, payload["config"], config)
    state = serialization.from_state_dict(template_state, payload["state"])
    return state, payload["history"]


def check_same_config(path, saved: dict, config) -> None:
    """Refuse, in one line naming the fields that differ, a checkpoint at
    `path` whose saved config (`saved`, as written) is not `config`. A field
    the checkpoint predates counts as saved at its default."""
    try:
        saved_config = type(config).from_dict(saved).to_dict()
    except ValueError as error:
        raise ValueError(f"checkpoint {path} is from another config ({error}); use another path or delete it") \
            from None
    current = config.to_dict()
    differing = sorted(key for key in set(current) | set(saved_config) if current.get(key) != saved_config.get(key))
    if differing:
        details = ", ".join(f"{key}: saved {saved_config.get(key)!r} vs {current.get(key)!r}" for key in differing)
        raise ValueError(f"checkpoint {path} is from another config ({details}); use another path or delete it")


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint to resume from: a msgpack file, or a
    folder with a saved step (a folder that is empty, or holds only orbax's
    temporary folder of a save cut short, has nothing to resume)."""
    path = Path(path)
    return path.is_file() or bool(_step_folders(path))


def saved_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's run resumes from (ValueError if it is not a readable checkpoint)."""
    return int(read_checkpoint(path)["state"]["step"])


def saved_steps(path: str | os.PathLike) -> list[int]:
    """The steps `path` holds, oldest first: a folder's complete steps (the
    last two saved), or a msgpack file's one step; [] where there is none."""
    path = Path(path)
    if path.is_file():
        return [saved_step(path)]
    return _step_folders(path)


def _step_folders(path: Path) -> list[int]:
    """The steps of a checkpoint folder's complete step folders (named by the
    step; orbax's temporary ones are not), oldest first; [] for no folder."""
    return sorted(int(child.name) for child in path.iterdir() if child.name.isdigit()) if path.is_dir() else []


def common_step(paths) -> int | None:
    """The latest step that every one of `paths` holds, or None where one of
    them holds none or they share none: where the runs of one program resume
    together. A process killed while it saved the runs of a program one after
    another leaves some at the new step and the rest at the one before, which
    all of them still hold (each keeps its last two)."""
    shared = None
    for path in paths:
        steps = set(saved_steps(path)) if path is not None else set()
        shared = steps if shared is None else shared & steps
    return max(shared) if shared else None


def read_checkpoint(path: str | os.PathLike, step: int | None = None) -> dict:
    """A checkpoint's content at its latest step (or `step`): {"config",
    "state", "history"} as saved, its SHA-256 verified. ValueError, in one
    line, for a path that is not a readable checkpoint or whose content does
    not match its checksum."""
    path = Path(path)
    if path.is_file():
        payload = read_msgpack_checkpoint(path)
        if step is not None and int(payload["state"]["step"]) != step:
            raise ValueError(f"checkpoint {path} holds step {int(payload['state']['step'])}, not {step}")
        return payload
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with _manager(path) as manager:
            step = manager.latest_step() if step is None else step
            if step is None or step not in manager.all_steps():
                raise ValueError("no complete step in it" if step is None else f"no step {step} in it")
            saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                  run=ocp.args.JsonRestore()))
        state, run = _as_numpy(dict(saved["state"])), dict(saved["run"])
    except Exception as error:  # a missing, cut or overwritten file: orbax, tensorstore or JSON says which
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {reason[:300]})") from error
    if run.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} checkpoint (format {run.get('format')!r})")
    if run.get("sha256") != digest(state, {key: value for key, value in run.items() if key != "sha256"}):
        raise ValueError(f"checkpoint {path} is damaged: its content does not match the SHA-256 saved with it; "
                         "delete it to train the run afresh")
    return {"config": run["config"], "state": state, "history": run["history"]}


def digest(state_dict: dict, run: dict) -> str:
    """SHA-256 of a checkpoint's content: every array of the state (its path,
    dtype, shape and bytes, in path order) and the run's JSON (sorted keys)."""
    sha = hashlib.sha256()
    for key_path, leaf in sorted(jax.tree_util.tree_flatten_with_path(state_dict)[0],
                                 key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        sha.update(f"{jax.tree_util.keystr(key_path)}|{array.dtype.str}|{array.shape}|".encode())
        sha.update(array.tobytes())
    sha.update(json.dumps(run, sort_keys=True).encode())
    return sha.hexdigest()


def _manager(path: Path, create: bool = False) -> ocp.CheckpointManager:
    """orbax's manager of the checkpoint folder `path` (made if `create`):
    the last two steps kept (`common_step`), saved synchronously by this
    process alone (so no other process waits on it)."""
    if create:  # orbax makes it only with every process taking part
        path.mkdir(parents=True, exist_ok=True)
    processes = ocp.options.MultiprocessingOptions(
        primary_host=None, active_processes={jax.process_index()},
        barrier_sync_key_prefix=f"bnjax-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}")
    return ocp.CheckpointManager(path.resolve(), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=False, enable_async_checkpointing=False, multiprocessing_options=processes))


def _as_numpy(tree):
    """Restored arrays as numpy arrays on the host (orbax gives jax arrays)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def read_msgpack_checkpoint(path: Path) -> dict:
    """The payload of a checkpoint file in the msgpack format (config, state,
    history as saved), its format and SHA-256 verified."""
    try:
        wrapper = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(wrapper, dict) or wrapper.get("format") != MSGPACK_FORMAT:
        found = wrapper.get("format") if isinstance(wrapper, dict) else None
        raise ValueError(f"checkpoint {path} is not a {MSGPACK_FORMAT} file (format {found!r}: older bnjax "
                         "checkpoints carry no checksum); delete it to train the run afresh")
    if not isinstance(wrapper.get("payload"), bytes) or \
            hashlib.sha256(wrapper["payload"]).hexdigest() != wrapper.get("sha256"):
        raise ValueError(f"checkpoint {path} is damaged: its content does not match the SHA-256 saved with it; "
                         "delete it to train the run afresh")
    return serialization.msgpack_restore(wrapper["payload"])
