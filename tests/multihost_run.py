"""One of two processes of a multi-host run on this machine (tests/test_multihost.py
starts both). Each process owns one CPU device; JAX's distributed runtime
joins them into one 2-device mesh. Prints the History as JSON. Both processes
are given a checkpoint path of their own: only process 0 may write."""

import json
import sys

import jax

coordinator, process_id, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)

from bnjax.train import TrainConfig, train  # noqa: E402
from conftest import make_dataset  # noqa: E402

assert jax.device_count() == 2 and jax.local_device_count() == 1, (jax.device_count(), jax.local_device_count())
config = TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=32, epochs=1, eval_every=4,
                     eval_batch_size=64)
history, _ = train(config, make_dataset(num_train=512, num_test=128), checkpoint_path=checkpoint.format(process=process_id))
print(json.dumps({"process": process_id, **history.to_dict()}))
jax.distributed.shutdown()
