"""The BN state tour runs top to bottom (its cells assert the numbers they show)."""

from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bn_state_tour_executes(mnist):  # `mnist` makes sure the data is cached before the kernel starts
    notebook = nbformat.read(ROOT / "notebooks" / "bn_state_tour.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "running statistics still at their initial values: True" in outputs
    assert "ModifyScopeVariableError" in outputs


@pytest.mark.slow
def test_colab_notebook_executes_at_smoke_size(mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("BNJAX_SMOKE_STEPS", "20")
    monkeypatch.setenv("BNJAX_OUT", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / "colab_tpu.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert "| 0.01 | relu |" in (tmp_path / "summary.md").read_text()
    shown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert sum("image/png" in output.get("data", {}) for output in shown) == 3  # the curves, inline
    printed = "".join(output.get("text", "") for output in shown)
    assert f"jax      {jax.__version__}" in printed and "flax     " in printed  # the versions it ended up with
