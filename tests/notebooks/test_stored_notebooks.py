"""The stored notebooks: no outputs, one shared setup cell, a size cell, a test that runs each,
and an "Open in Colab" line in the README. Adding notebooks/NAME.ipynb means adding
tests/notebooks/test_NAME.py (one `run_notebook("NAME.ipynb")` call) and its README line."""
import re

import nbformat
import pytest

from tests.notebooks import harness

NOTEBOOKS = harness.notebook_paths()
NAMES = [path.name for path in NOTEBOOKS]
COLAB_URL = "https://colab.research.google.com/github/hybrid-jax/hybrid_jax/blob/main/notebooks/{name}"
REPO_URL = "https://github.com/hybrid-jax/hybrid_jax"


def _read(path):
    return nbformat.read(path, as_version=4)


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no .ipynb in {harness.NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_stored_without_outputs(path):
    notebook = _read(path)
    nbformat.validate(notebook)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before "
                       "committing (Jupyter: Edit > Clear All Outputs; or `jupyter nbconvert --clear-output "
                       "--inplace notebooks/*.ipynb`)")


def test_every_notebook_starts_with_the_same_setup_cell():
    first_cells = {path.name: _code_cells(_read(path))[0].source for path in NOTEBOOKS}
    reference = first_cells[NAMES[0]]
    assert f'REPO_URL = "{REPO_URL}"' in reference
    differing = [name for name, source in first_cells.items() if source != reference]
    assert not differing, f"the first code cell of {differing} differs from that of {NAMES[0]}; keep them identical"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_sizes_come_from_the_environment(path):
    size_cell = _code_cells(_read(path))[1].source
    assert harness.SIZE_VARIABLE in size_cell, f"{path.name}: the second code cell must read {harness.SIZE_VARIABLE}"
    for size in ("tiny", "cpu", "accelerator"):
        assert f'"{size}"' in size_cell, f"{path.name}: the size cell defines no {size!r} size"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_every_notebook_is_executed_by_a_test(path):
    test_file = harness.REPO_ROOT / "tests" / "notebooks" / f"test_{path.stem}.py"
    assert test_file.is_file() and f'run_notebook("{path.name}")' in test_file.read_text(), (
        f"add {test_file.relative_to(harness.REPO_ROOT)} calling run_notebook({path.name!r}), "
        "so that `make test` executes it (one file per notebook lets pytest-xdist spread them)")


def test_readme_opens_every_notebook_in_colab():
    readme = (harness.REPO_ROOT / "README.md").read_text()
    missing = [name for name in NAMES if COLAB_URL.format(name=name) not in readme]
    assert not missing, f"README.md has no 'Open in Colab' link for {missing}"
    linked = set(re.findall(re.escape(COLAB_URL.format(name="")) + r"([\w.-]+\.ipynb)", readme))
    stale = sorted(linked - set(NAMES))
    assert not stale, f"README.md links notebooks that do not exist: {stale}"
