"""notebooks/05_linearise_a_pretrained_model.ipynb runs top to bottom at tiny size
(tests/notebooks/harness.py): a random 2-layer Llama written to GGUF and converted with
hybrid_jax.convert, LoLCATs attention transfer on a few steps per layer, the held-out perplexities of
the original, swap-only, transferred and hybrid models, the per-layer transfer errors' bar chart and
greedy continuations."""
import pytest


@pytest.mark.slow
def test_05_linearise_a_pretrained_model_runs(run_notebook):
    run_notebook("05_linearise_a_pretrained_model.ipynb")
