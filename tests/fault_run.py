"""Run by tests/test_fault_injection.py as a separate process, to be killed:

    python tests/fault_run.py sweep RESULTS_PATH     # 4 MLP runs, worker processes, resumable
    python tests/fault_run.py single CHECKPOINT OUT  # one run checkpointed at every evaluation

Both train on the synthetic set of conftest.py; what they write is what the
test inspects after each kill and compares with an uninterrupted run."""

import dataclasses
import sys
from pathlib import Path

from bnjax.support.atomic import write_json
from bnjax.training.config import TrainConfig
from bnjax.training.train import train
from conftest import make_dataset
from experiments.results import run_resumable
from experiments.sweep import run_sweep

BASE = TrainConfig(model="mlp", batch_norm=True, activation="relu", batch_size=16, epochs=100, max_steps=1000,
                   eval_every=50, eval_batch_size=64, shuffle=True)
SWEEP = [dataclasses.replace(BASE, seed=seed, learning_rate=learning_rate)
         for learning_rate in (0.001, 0.003) for seed in (0, 1)]


def main():
    mode, *paths = sys.argv[1:]
    if mode == "sweep":
        run_resumable(lambda: run_sweep(SWEEP, Path(paths[0]), make_dataset, name="fault"))
    elif mode == "single":
        checkpoint, out = paths
        history, _ = train(BASE, make_dataset(), checkpoint_path=checkpoint,
                           on_eval=lambda config, step, total, record: print(f"step {step}", flush=True))
        write_json(out, history.to_dict())
    else:
        raise SystemExit(f"unknown mode {mode!r}; allowed: sweep, single")


if __name__ == "__main__":
    main()
