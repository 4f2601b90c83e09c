"""examples/functional_api.ipynb runs top to bottom in a Jupyter kernel, and is kept without outputs."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "functional_api.ipynb"


def test_the_functional_api_notebook_runs_top_to_bottom():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit the notebook without outputs"
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
  printed = "".join(out.get("text", "") for cell in code for out in cell.outputs if out.output_type == "stream")
  assert "Paris" in printed  # the generated answer
  assert "largest difference from the full log-softmax" in printed and "after one step" in printed
