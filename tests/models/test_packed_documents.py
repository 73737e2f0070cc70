"""Packed documents through HybridLM: a packed row gives every document the logits it gets alone, and
prefill + decode after a packed prompt continue its last document as if it had been prompted alone.

Parametrised over experiment configs; `CONFIGS` lists those whose mixer ops all take `segment_ids`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.models.hybrid_lm import build_model
from tests.train.helpers import ROOT

CONFIGS = ["transformer"]
T, MAX_LEN = 16, 20
# Row 0: documents of 5, 1 and 7 tokens, then 3 padding; row 1: documents of 9 and 7 tokens.
LAYOUT = [[5, 1, 7], [9, 7]]


def packed_rows(vocab_size: int):
    """(tokens, segment_ids) `[2, T]` and the documents of each row."""
    rng = np.random.default_rng(0)
    tokens, segment_ids = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32)
    docs = []
    for row, lengths in enumerate(LAYOUT):
        start, row_docs = 0, []
        for number, length in enumerate(lengths, 1):
            doc = rng.integers(0, vocab_size, length).astype(np.int32)
            tokens[row, start:start + length], segment_ids[row, start:start + length] = doc, number
            row_docs.append((start, doc))
            start += length
        docs.append(row_docs)
    return jnp.asarray(tokens), jnp.asarray(segment_ids), docs


@pytest.fixture(scope="module", params=CONFIGS)
def model(request):
    config = load_config(f"{ROOT}/experiments/configs/{request.param}.py:tiny")
    return build_model(config.model, rngs=nnx.Rngs(0))


def rel_err(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def test_packed_forward_equals_each_document_alone(model):
    tokens, segment_ids, docs = packed_rows(model.vocab_size)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens, **documents: nnx.merge(graphdef, state)(tokens, **documents))
    forward = lambda tokens, **documents: run(state, tokens, **documents)  # noqa: E731
    packed = forward(tokens, segment_ids=segment_ids)
    alone_docs = [doc for row_docs in docs for _, doc in row_docs]
    alone = jnp.zeros((len(alone_docs), T), jnp.int32)  # right-padded: causal logits never see the padding
    for i, doc in enumerate(alone_docs):
        alone = alone.at[i, :len(doc)].set(doc)
    alone_logits = forward(alone)
    i = 0
    for row, row_docs in enumerate(docs):
        for start, doc in row_docs:
            assert rel_err(packed[row, start:start + len(doc)], alone_logits[i, :len(doc)]) < 1e-5
            i += 1
    # the unpacked forward does mix the documents of a row (the check above can fail)
    assert rel_err(forward(tokens)[0, 6:13], alone_logits[2, :7]) > 1e-3


def test_prefill_and_decode_after_a_packed_prompt_continue_the_last_document(model):
    tokens, segment_ids, docs = packed_rows(model.vocab_size)
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda state, tokens, **prompt: nnx.merge(graphdef, state).prefill(
        tokens, max_len=MAX_LEN, **prompt))
    decode_step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state).decode_step(tokens, cache))
    logits, cache = prefill(state, tokens, segment_ids=segment_ids)
    np.testing.assert_array_equal(cache.position, [7, 7])  # last position + 1 of each row's last document
    last = [row_docs[-1][1] for row_docs in docs]
    alone = jnp.zeros((2, T), jnp.int32).at[0, :7].set(last[0]).at[1, :7].set(last[1])
    alone_logits, alone_cache = prefill(state, alone, lengths=jnp.array([7, 7]))
    np.testing.assert_array_equal(alone_cache.position, cache.position)
    assert rel_err(logits[0, 6:13], alone_logits[0, :7]) < 1e-5
    for next_tokens in (jnp.array([3, 4]), jnp.array([5, 6])):
        packed_step, cache = decode_step(state, next_tokens, cache)
        alone_step, alone_cache = decode_step(state, next_tokens, alone_cache)
        assert rel_err(packed_step, alone_step) < 1e-5


def test_document_keywords_are_checked(model):
    tokens, segment_ids, _ = packed_rows(model.vocab_size)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array \[B, T\] = \[2, 16\]"):
        model(tokens, segment_ids=segment_ids[:, :8])
    with pytest.raises(ValueError, match="give lengths or segment_ids / positions, not both"):
        model.prefill(tokens, segment_ids=segment_ids, lengths=jnp.array([16, 16]), max_len=MAX_LEN)
