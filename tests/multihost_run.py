"""One of two processes of a multi-host run on this machine (tests/test_multihost.py
starts both). Each process owns one CPU device; JAX's distributed runtime
joins them into one 2-device mesh. Prints the History as JSON. Both processes
are given a checkpoint path of their own: only process 0 may write.
With a fourth argument "sweep": a sweep of 4 runs through train_many instead,
spread over both processes' devices (the third argument: its checkpoint folder)."""

import json
import sys

import jax

coordinator, process_id, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "run"
jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)

from bnjax.engine.launch import train_many  # noqa: E402
from bnjax.engine.loop import train_runs  # noqa: E402
from bnjax.training.config import TrainConfig  # noqa: E402
from conftest import make_dataset, observer  # noqa: E402

assert jax.device_count() == 2 and jax.local_device_count() == 1, (jax.device_count(), jax.local_device_count())
if mode == "sweep":
    sweep = [TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=32, max_steps=8, eval_every=4,
                         eval_batch_size=64, seed=seed) for seed in range(4)]
    heard = []
    results = train_many(sweep, make_dataset(num_train=512, num_test=128), observer=observer(
        checkpoint_dir=checkpoint, on_done=lambda config, history, state: heard.append(sweep.index(config))))
    print(json.dumps({"process": process_id, "heard": heard, "histories": [h.to_dict() for h, _ in results],
                      "final_steps": [int(state.step) for _, state in results]}))
else:
    config = TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=32, epochs=1, eval_every=4,
                         eval_batch_size=64)
    # One run over both processes' devices: the engine's loop (the plain loop runs on one device).
    [(history, _)] = train_runs([config], make_dataset(num_train=512, num_test=128),
                                checkpoint_paths=[checkpoint.format(process=process_id)])
    print(json.dumps({"process": process_id, **history.to_dict()}))
jax.distributed.shutdown()
