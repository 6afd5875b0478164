"""Replays run INDEX of RESULTS (trained on `conftest.make_dataset`) in this
fresh process, launched as the run was (tests/test_sweep.py), and prints its
History as JSON."""

import json
import sys

from bnjax.engine.launch import launch_like, replay
from conftest import make_dataset

results_path, index = sys.argv[1], int(sys.argv[2])
run = json.loads(open(results_path).read())["runs"][index]
launch_like(run["launch"])
print(json.dumps(replay(run, make_dataset()).to_dict()))
