"""Where a result came from: library versions, the machine and the bnjax commit,
recorded beside every saved result (results.json, `python -m bnjax --save`)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import flax
import jax
import numpy as np
import optax

from bnjax.support import host

REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout bnjax/ sits in, if any (bnjax/support/provenance.py)


def bnjax_commit() -> str | None:
    """The bnjax commit this code is at ("+changes" when bnjax/ or experiments/
    differ from it), or None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changes = git("status", "--porcelain", "--", "bnjax", "experiments")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def environment() -> dict:
    """Library versions, the machine and the bnjax commit that produced a result."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "machine": platform.machine(),
        "cpu": host.cpu_name(),  # None: the platform does not say
        "cpu_cores": host.usable_core_count(),
        "bnjax_commit": bnjax_commit(),
    }


# What makes two environments "the same setup" for the purpose of saying where results came from.
SETUP_FIELDS = ("jax", "flax", "optax", "platform", "device", "device_count", "machine", "cpu", "cpu_cores")


def describe_environment(env: dict) -> str:
    """One line: the machine and library versions an `environment()` records (older files record fewer)."""
    cpu = env.get("cpu") or f"a CPU of unknown name ({env.get('machine', '?')})"
    cores = f", {env['cpu_cores']} cores" if env.get("cpu_cores") else ""
    device = cpu + cores if env.get("platform") == "cpu" else f"{env.get('device', '?')} x{env.get('device_count', 1)}"
    commit = f", bnjax {env['bnjax_commit']}" if env.get("bnjax_commit") else ""
    return (f"{device}; jax {env.get('jax', '?')}, flax {env.get('flax', '?')}, optax {env.get('optax', '?')}"
            f"{commit}")


def same_setup(saved: dict, here: dict) -> bool:
    return all(saved.get(field) == here.get(field) for field in SETUP_FIELDS)


# What float32 convolutions and matrix products really compute, per backend
# and JAX matmul precision (docs.jax.dev "Matmul precision"): TPUs multiply
# in bfloat16 passes, NVIDIA GPUs from Ampere on in TF32, CPUs in float32.
_FLOAT32_ARITHMETIC = {
    "tpu": {"default": "TPU default: one bfloat16 pass", "high": "TPU high: three bfloat16 passes",
            "highest": "float32"},
    "gpu": {"default": "GPU default: TF32 (Ampere and later; float32 before)",
            "high": "GPU high: TF32 (Ampere and later; float32 before)", "highest": "float32"},
}


def effective_precision(platform_name: str, compute_dtype: str, matmul_precision: str) -> str:
    """How a run's convolutions and matrix products were computed, in words,
    e.g. "float32 arrays; products: TPU default: one bfloat16 pass"."""
    if compute_dtype == "bfloat16":
        return "bfloat16 arrays (float32 parameters, optimizer state and BN statistics); products: bfloat16"
    products = _FLOAT32_ARITHMETIC.get(platform_name, {}).get(matmul_precision, "float32")
    return f"float32 arrays; products: {products}"
