"""notebooks/02_train_a_hybrid.ipynb runs top to bottom at tiny size (tests/notebooks/harness.py):
Kimi Linear tiny trained for a few steps through hybrid_jax.train, its loss curve from
metrics.jsonl, a sample from the checkpoint, and its decode cache against the transformer's."""
import pytest


@pytest.mark.slow
def test_02_train_a_hybrid_runs(run_notebook):
    run_notebook("02_train_a_hybrid.ipynb")
