"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts, hence the separate process). Prints one JSON object of Histories."""

import dataclasses
import json
import sys

import jax

from bnjax.engine.launch import train_many
from bnjax.engine.loop import train_runs
from bnjax.training.config import TrainConfig
from conftest import make_dataset


def main():
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
    data = make_dataset(num_train=512, num_test=128)
    # The BN paper's MLP, which compiles in about half the CNN's time: the same
    # loop and the same psum/pmean paths. That every BN of the article's CNN
    # averages over the devices, spatial axes included, is tested in the test
    # process (tests/test_parallel.py).
    base = TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=32, epochs=2, eval_every=4,
                       eval_batch_size=64)
    runs = {
        "sync_1": dataclasses.replace(base, num_devices=1, eval_statistics="precise", precise_bn_batches=8),
        "sync_2": dataclasses.replace(base, num_devices=2, eval_statistics="precise", precise_bn_batches=8),
        "sync_8": dataclasses.replace(base, num_devices=8, eval_statistics="precise", precise_bn_batches=8),
        "ghost_8": dataclasses.replace(base, num_devices=8, ghost_bn=True),
        "plain_8": dataclasses.replace(base, batch_norm=False, num_devices=8),
        "plain_1": dataclasses.replace(base, batch_norm=False, num_devices=1),
    }
    histories = {}
    for name, config in runs.items():
        [(history, state)] = train_many([config], data)
        histories[name] = {**history.to_dict(), "final_step": int(state.step)}
    # Two runs (seeds 0 and 1) as one vmapped program over 2 devices, synchronized and ghost BN.
    for ghost_bn in (False, True):
        runs_of_program = [dataclasses.replace(base, num_devices=2, ghost_bn=ghost_bn, seed=seed) for seed in (0, 1)]
        try:
            results = train_runs(runs_of_program, data)
        except ValueError as error:  # ghost BN stacks are refused below jax 0.10 (bnjax/engine/loop.py)
            histories[f"{'ghost' if ghost_bn else 'sync'}_2_stacked_error"] = str(error)
            continue
        for seed, (history, state) in enumerate(results):
            histories[f"{'ghost' if ghost_bn else 'sync'}_2_stacked_seed{seed}"] = {
                **history.to_dict(), "final_step": int(state.step)}
    histories["ghost_2"] = train_many([dataclasses.replace(base, num_devices=2, ghost_bn=True)], data)[0][0].to_dict()
    try:
        train_many([dataclasses.replace(base, batch_size=36, num_devices=8)], data)
    except ValueError as error:
        histories["indivisible_error"] = str(error)
    json.dump(histories, sys.stdout)


if __name__ == "__main__":
    main()
