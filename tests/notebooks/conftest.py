"""The `run_notebook` fixture: `run_notebook("01_mixers_tour.ipynb")` executes it at tiny size."""
import pytest

from tests.notebooks import harness


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    jupyter_dir = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    return lambda name: harness.execute(name, jupyter_dir)
