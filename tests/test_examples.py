"""The examples of bnjax in a user's own training loop (examples/) run as a
user runs them, on real MNIST at a few steps: linen with flax's TrainState and
`batch_stats`, NNX with `nnx.Optimizer`, each ending with precise BN and the
check-up."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("example", ["linen_train_state.py", "nnx_optimizer.py"])
def test_the_example_trains_and_ends_with_precise_bn_and_the_checkup(example, mnist):
    result = subprocess.run([sys.executable, str(EXAMPLES / example), "--steps", "20"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 20 steps, last loss" in result.stdout
    assert re.search(r"^metric with running averages 0\.\d{4}, precise statistics 0\.\d{4}, batch statistics 0\.\d{4}$",
                     result.stdout, re.M)
    assert re.search(r"^(up to date|stale): ", result.stdout, re.M)
    accuracy = float(re.search(r"test accuracy with precise BN statistics: (0\.\d{4})", result.stdout).group(1))
    assert accuracy > 0.5  # 20 steps of Adam on MNIST: well above chance (0.1)
