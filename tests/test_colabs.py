"""Every notebook in colabs/ runs headless, top to bottom, with the quick parameters."""

import glob
import os

import pytest
from conftest import FAST_COMPILE

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "colabs", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ARJAX_COLAB_QUICK", "1")
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # the kernel is a fresh process: one CPU device
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert os.path.isdir(tmp_path / "runs")
