"""The tutorial notebooks run top to bottom in a fresh kernel, in fast mode.

Each ``notebooks/NN_name.py`` (a jupytext percent script) is read with ``jupytext.read`` and
executed by nbclient with ``SDE_DIFFUSION_FAST=1`` in a kernel started from a kernelspec written on
the fly for ``sys.executable``, so the kernel runs this test's interpreter (and its installed
``sde_diffusion``) whatever kernelspecs the machine has. Any cell error fails the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jupytext
import nbclient
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.py"))
KERNEL_NAME = "sde-diffusion-tests"
CELL_TIMEOUT = 300  # seconds per cell


def kernel_manager(directory: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec runs ``sys.executable -m ipykernel_launcher``."""
    spec = directory / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL_NAME, "language": "python"}))
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(directory)]))


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks/NN_name.py found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = path.read_text()
    assert "SDE_DIFFUSION_FAST" in source, f"{path.name} must scale its work with the SDE_DIFFUSION_FAST variable"
    notebook = jupytext.read(path)
    monkeypatch.setenv("SDE_DIFFUSION_FAST", "1")  # the kernel inherits os.environ
    client = nbclient.NotebookClient(
        notebook,
        km=kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute(cleanup_kc=True)  # raises CellExecutionError on the first failing cell
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.execution_count is not None for cell in code_cells)
    figures = [out for cell in code_cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert figures, f"{path.name} shows no figure"
