"""bnjax's train step compiled for a described H100 on this CPU, without the
GPU (JAX's CUDA plugin; benchmarks/gpu_programs.py). Needs
`pip install "jax[cuda12]==<jax's version>"` (several GB), which CI does not
install: skipped without it. Runs in a process of its own, since the plugin
compiles only while JAX runs on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import jax_plugins.xla_cuda12  # noqa: F401

    HAVE_CUDA_PLUGIN = True
except ImportError:
    HAVE_CUDA_PLUGIN = False

PROBE = """
import json
from benchmarks import gpu_programs
device = gpu_programs.gpu_device("NVIDIA H100 80GB HBM3")
print(json.dumps(gpu_programs.compile_and_describe(gpu_programs.programs(device)[0][1])))
"""


@pytest.mark.skipif(not HAVE_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (jax[cuda12])")
def test_the_train_step_compiles_for_an_h100_without_one():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    described = json.loads(result.stdout.strip().splitlines()[-1])
    assert described["compiled"], described
    assert 0 < described["memory_fraction"] < 0.01 and described["fusions"] > 10
