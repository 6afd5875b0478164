"""Colab's TPU runtime as it is today, rebuilt on Python 3.13 with its
published package versions (JAX on the CPU here): the notebook, run from a
fresh folder with a clone of this repository beside it, installs bnjax,
keeps the runtime's jax, jaxlib and libtpu exactly as they were and trains
the sweep at smoke size."""

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from bnjax.support.cache_dir import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]

# Colab's TPU runtime (Python 3.13), as its published package list has it (2026).
COLAB_TPU_RUNTIME = {"jax": "0.7.2", "jaxlib": "0.7.2", "libtpu": "0.0.21.1", "flax": "0.11.2", "optax": "0.2.8",
                     "orbax-checkpoint": "0.12.4", "tensorflow-datasets": "4.9.10"}
ACCELERATOR_STACK = ("jax", "jaxlib", "libtpu")  # what the install must leave as it is
NOTEBOOK_RUNTIME = ["ipykernel", "nbclient", "nbformat", "matplotlib"]  # what any notebook runtime has

RUN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[3])
"""


def python_313() -> str | None:
    """A Python 3.13 interpreter: $BNJAX_PYTHON313, pyenv's 3.13, or python3.13 on the PATH."""
    candidates = [os.environ.get("BNJAX_PYTHON313")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python3.13")), reverse=True)
    candidates.append(shutil.which("python3.13"))
    for candidate in filter(None, candidates):
        result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
                                capture_output=True, text=True, env={**os.environ, "PYENV_VERSION": "3.13.0"})
        if result.stdout.strip() == "True":
            return candidate
    return None


def installed(python: Path) -> dict[str, str]:
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                             check=True).stdout
    return {package["name"].lower(): package["version"] for package in json.loads(listing)}


PYTHON_313 = python_313()


@pytest.mark.slow
@pytest.mark.skipif(PYTHON_313 is None, reason="no Python 3.13 found ($BNJAX_PYTHON313, pyenv, python3.13 on PATH): "
                                                "Colab's runtime cannot be rebuilt here")
def test_the_colab_notebook_keeps_the_tpu_runtimes_jax(tmp_path, mnist):  # `mnist`: cached before the kernel starts
    environment = tmp_path / "runtime"
    subprocess.run([PYTHON_313, "-m", "venv", str(environment)], check=True, timeout=300)
    python = environment / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    packages = [f"{name}=={version}" for name, version in COLAB_TPU_RUNTIME.items()]
    result = subprocess.run(pip + packages + NOTEBOOK_RUNTIME, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = installed(python)
    assert {name: runtime[name] for name in COLAB_TPU_RUNTIME} == COLAB_TPU_RUNTIME

    # A fresh folder with the repository cloned beside the notebook, as the notebook's first cell would.
    folder = tmp_path / "colab"
    folder.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder / "bnjax-repo")], check=True, timeout=300)
    # The runtime's own environment: none of this process's Python, JAX or XLA settings
    # (bnjax sets XLA_FLAGS for the jax it runs with; jax 0.7.2 refuses flags it does not know).
    environment_variables = {key: value for key, value in os.environ.items()
                             if key not in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR", "VIRTUAL_ENV", "XLA_FLAGS")}
    environment_variables.update(JAX_PLATFORMS="cpu", BNJAX_SMOKE_STEPS="20", BNJAX_OUT=str(tmp_path / "out"),
                                 BNJAX_CACHE_DIR=str(default_cache_dir()), BNJAX_COMPILATION_CACHE="0",
                                 PATH=f"{environment / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executed = tmp_path / "executed.ipynb"
    result = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(ROOT / "notebooks" / "colab_tpu.ipynb"), str(folder),
                             str(executed)], capture_output=True, text=True, env=environment_variables, timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]

    after = installed(python)
    assert {name: after[name] for name in ACCELERATOR_STACK} == {name: runtime[name] for name in ACCELERATOR_STACK}
    assert after["bnjax"]  # installed from the clone
    printed = "".join(output.get("text", "") for cell in nbformat.read(executed, as_version=4).cells
                      if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert f"flax 0.11.2 -> {after['flax']}" in printed and "jax 0.7.2 ->" not in printed, printed[-3000:]
    assert "jax      0.7.2" in printed and "libtpu   0.0.21.1" in printed
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert "| 0.01 | relu |" in (tmp_path / "out" / "summary.md").read_text()
