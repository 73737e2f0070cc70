"""notebooks/01_mixers_tour.ipynb runs top to bottom at tiny size (tests/notebooks/harness.py):
every mixer's probed attention matrix, the Fenwick levels, candidate isolation, the table of
differences between impls (checked inside the notebook) and the mixer benchmark's curves."""
import pytest


@pytest.mark.slow
def test_01_mixers_tour_runs(run_notebook):
    run_notebook("01_mixers_tour.ipynb")
