"""Runs the notebooks of `notebooks/` the way a reader would, top to bottom, at tiny sizes.

`execute(name, jupyter_dir)` starts a fresh IPython kernel on this interpreter (`sys.executable`, so
the kernel sees the packages of the venv running the tests; its kernelspec is written under
`jupyter_dir`, a temporary JUPYTER_PATH folder: nothing is installed globally), with notebooks/ as
working directory and this process's environment, except that it

* sets HYBRID_JAX_NOTEBOOK_SIZE=tiny (the notebooks' size cell reads it) and JAX_PLATFORMS=cpu;
* drops the 8 fake CPU devices that tests/conftest.py gives the test process: a notebook sees the one
  device a reader's machine has.

Any cell that raises fails the test with that cell's traceback (nbclient's CellExecutionError);
a cell that runs past CELL_TIMEOUT_S fails too. A notebook must also leave notebooks/ as it found it
(run directories belong in a temporary folder) and show at least one figure.

Adding a notebook: notebooks/NAME.ipynb, tests/notebooks/test_NAME.py with one
`run_notebook("NAME.ipynb")` call (one file per notebook, so that `pytest -n 2 --dist loadfile`
spreads them over the workers), and its "Open in Colab" line in README.md; test_stored_notebooks.py
checks all three.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
SIZE_VARIABLE = "HYBRID_JAX_NOTEBOOK_SIZE"
KERNEL_NAME = "hybrid-jax-notebook-tests"
CELL_TIMEOUT_S = 300
_FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def notebook_paths() -> list[pathlib.Path]:
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def write_kernelspec(jupyter_dir: pathlib.Path) -> None:
    """A kernelspec named KERNEL_NAME under `jupyter_dir`/kernels that launches this interpreter."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def kernel_environment(jupyter_dir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split() if not flag.startswith(_FAKE_DEVICES_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update({SIZE_VARIABLE: "tiny", "JAX_PLATFORMS": "cpu", "JUPYTER_PATH": str(jupyter_dir)})
    return env


def _listing(folder: pathlib.Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if "__pycache__" not in path.parts}


def _figures(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def execute(name: str, jupyter_dir: pathlib.Path):
    """Executes notebooks/`name` in a fresh kernel; returns the executed notebook (not saved).

    The caller puts `jupyter_dir` on this process's JUPYTER_PATH (the `run_notebook` fixture does),
    where the kernel manager looks the kernelspec up.
    """
    path = NOTEBOOKS_DIR / name
    assert path.is_file(), f"{path} does not exist; notebooks are {[p.name for p in notebook_paths()]}"
    write_kernelspec(jupyter_dir)
    env = kernel_environment(jupyter_dir)
    notebook = nbformat.read(path, as_version=4)
    before = _listing(NOTEBOOKS_DIR)
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute(env=env)
    written = _listing(NOTEBOOKS_DIR) - before
    assert not written, f"{name} wrote into notebooks/: {sorted(written)}; use a temporary folder"
    assert _figures(notebook) > 0, f"{name} showed no figure"
    return notebook
