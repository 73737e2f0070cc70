"""notebooks/04_decoding_costs.ipynb runs top to bottom at tiny size (tests/notebooks/harness.py):
decode latency and cache bytes against context for the transformer and the hybrids, with the
measured cache checked against hybrid_jax.inspect's accounting inside the notebook."""
import pytest


@pytest.mark.slow
def test_04_decoding_costs_runs(run_notebook):
    run_notebook("04_decoding_costs.ipynb")
