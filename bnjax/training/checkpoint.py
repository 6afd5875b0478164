"""Save and restore a whole training run: TrainState + History + config.

One msgpack file per run, written atomically with flax.serialization. Why not
orbax-checkpoint: the whole state of these nets is ~1 MB and fully replicated,
so one file written by process 0 is all a restart needs, with no extra
dependency, no async machinery and no directory layout to learn; orbax is the
right tool once parameters are sharded across hosts or reach gigabytes.

What is saved: params, batch_stats, optimizer state and step (the TrainState),
the History so far, and the config. The PRNG needs no saving: the only
randomness is the initialization (from `config.seed`) and the per-epoch batch
order (from `config.seed` and the epoch), both recomputed exactly.

The file is a msgpack map of the format's name, the SHA-256 of the payload
and the payload (the msgpack of all the above): bytes changed anywhere in it
make it refuse to load, where msgpack alone would often parse them into
other numbers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
from flax import serialization

from bnjax.support.atomic import atomic_write


FORMAT = "bnjax-checkpoint-2"  # with a checksum


def save_checkpoint(path: str | os.PathLike, state, history, config) -> None:
    """Write the run's state atomically. A run over several processes'
    devices is saved by process 0 alone (the engine's loop decides)."""
    payload = {
        "config": config.to_dict(),
        "state": serialization.to_state_dict(jax.device_get(state)),
        "history": history.to_dict(),
    }
    payload_bytes = serialization.msgpack_serialize(payload)
    with atomic_write(path, "wb") as file:
        file.write(serialization.msgpack_serialize(
            {"format": FORMAT, "sha256": hashlib.sha256(payload_bytes).hexdigest(), "payload": payload_bytes}))


def restore_checkpoint(path: str | os.PathLike, template_state, config):
    """(state, history_dict) from `path`, into the structure of `template_state`.

    Raises ValueError if the checkpoint belongs to another config, naming the
    fields that differ, and if the file is not a readable checkpoint."""
    payload = read_checkpoint(path)
    # A field the checkpoint predates counts as saved at its default.
    try:
        saved_config = type(config).from_dict(payload["config"]).to_dict()
    except ValueError as error:
        raise ValueError(f"checkpoint {path} is from another config ({error}); use another path or delete it") \
            from None
    current = config.to_dict()
    differing = sorted(key for key in set(current) | set(saved_config) if current.get(key) != saved_config.get(key))
    if differing:
        details = ", ".join(f"{key}: saved {saved_config.get(key)!r} vs {current.get(key)!r}" for key in differing)
        raise ValueError(f"checkpoint {path} is from another config ({details}); use another path or delete it")
    state = serialization.from_state_dict(template_state, payload["state"])
    return state, payload["history"]


def saved_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's run resumes from (ValueError if it is not a readable checkpoint)."""
    return int(read_checkpoint(path)["state"]["step"])


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's payload (config, state, history as saved), its format
    and SHA-256 verified: ValueError for a file that is not a readable
    checkpoint or whose content does not match its checksum."""
    try:
        wrapper = serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        found = wrapper.get("format") if isinstance(wrapper, dict) else None
        raise ValueError(f"checkpoint {path} is not a {FORMAT} file (format {found!r}: older bnjax checkpoints "
                         "carry no checksum); delete it to train the run afresh")
    if not isinstance(wrapper.get("payload"), bytes) or \
            hashlib.sha256(wrapper["payload"]).hexdigest() != wrapper.get("sha256"):
        raise ValueError(f"checkpoint {path} is damaged: its content does not match the SHA-256 saved with it; "
                         "delete it to train the run afresh")
    return serialization.msgpack_restore(wrapper["payload"])
