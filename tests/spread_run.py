"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices:
a sweep of 8 runs through `train_many`, spread over the devices (or, with
--data-parallel, each run's batch split over all 8). Prints one JSON object."""

import dataclasses
import json
import sys

import jax

from bnjax.engine.launch import train_many
from bnjax.engine.strategy import default_strategy
from bnjax.training.config import TrainConfig
from conftest import make_dataset, observer


def main():
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
    data_parallel = "--data-parallel" in sys.argv
    data = make_dataset(num_train=256, num_test=64)
    base = TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=32, max_steps=8, eval_every=4,
                       eval_batch_size=64, num_devices=8 if data_parallel else None)
    sweep = [dataclasses.replace(base, seed=seed, learning_rate=rate) for seed in range(4) for rate in (0.001, 0.0005)]
    devices, heard = {}, []

    def on_done(config, history, state):
        devices[sweep.index(config)] = sorted(str(d) for d in jax.tree_util.tree_leaves(state.params)[0].devices())

    strategy = dataclasses.replace(default_strategy("cpu", 8), models_per_program=1)
    results = train_many(sweep, data, strategy=strategy, observer=observer(
        on_done=on_done, on_eval=lambda config, *_: heard.append(any(config is c for c in sweep))))
    out = {"devices": [devices[index] for index in range(len(sweep))], "heard": heard,
           "histories": [history.to_dict() for history, _ in results]}
    if not data_parallel:
        out["alone"] = [train_many([dataclasses.replace(config, num_devices=1)], data)[0][0].to_dict() for config in sweep]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
