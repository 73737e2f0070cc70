"""notebooks/03_layer_ratio_ablation.ipynb runs top to bottom at tiny size (tests/notebooks/harness.py):
two points of the kimi_ratio sweep (parameters matched) and two of the MQAR width sweep, each run
through `python -m experiments.sweep`'s main into a temporary folder, their results tables and plots,
and the training curves from the points' metrics.jsonl."""
import pytest


@pytest.mark.slow
def test_03_layer_ratio_ablation_runs(run_notebook):
    run_notebook("03_layer_ratio_ablation.ipynb")
