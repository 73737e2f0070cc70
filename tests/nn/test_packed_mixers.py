"""Mixer layers on packed documents: a packed row gives each document the output it gets alone, and
prefill + one decode step after a packed prompt equal those of its last document alone.

The kinds an experiment config uses are checked through whole models (tests/models/
test_packed_documents.py); `UNCONFIGURED_KINDS` are the others, each compiled once (with
tests/nn/test_mixers.py's small settings).
"""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.nn import MIXERS, build_mixer, mixer_config
from tests.nn.test_mixers import D_MODEL, SMALL
from tests.train.helpers import ROOT


def _configured_kinds() -> set[str]:
    kinds = set()
    for path in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")):
        if not path.endswith("__init__.py"):
            kinds |= {mixer.kind for mixer in load_config(f"{path}:tiny").model.mixers.values()}
    return kinds


UNCONFIGURED_KINDS = sorted(set(MIXERS) - _configured_kinds())
T, MAX_LEN = 12, 16
# Row 0: documents of 5, 1 and 4 tokens, then 2 padding; row 1: documents of 3 and 9 tokens.
SEGMENTS = np.array([[1] * 5 + [2] + [3] * 4 + [0] * 2, [1] * 3 + [2] * 9], np.int32)


def documents(row):
    ids = SEGMENTS[row]
    return [(int(np.argmax(ids == i)), int(np.sum(ids == i))) for i in range(1, ids.max() + 1)]


def alone_rows(x):
    """Every document alone, right-padded to T (causal outputs never see the padding), and the last
    document of each row with its length."""
    docs = [(row, start, length) for row in range(2) for start, length in documents(row)]
    alone = jnp.stack([jnp.zeros((T, D_MODEL)).at[:n].set(x[r, s:s + n]) for r, s, n in docs])
    last = [documents(row)[-1] for row in range(2)]
    tails = jnp.stack([jnp.zeros((T, D_MODEL)).at[:n].set(x[row, s:s + n]) for row, (s, n) in enumerate(last)])
    return docs, alone, tails, jnp.array([n for _, n in last], jnp.int32)


@pytest.mark.parametrize("kind", UNCONFIGURED_KINDS)
def test_packed_mixer_equals_each_document_alone(kind):
    layer = build_mixer(mixer_config(kind, **SMALL.get(kind, {})), D_MODEL, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, T, D_MODEL), jnp.float32)
    x_next = jax.random.normal(jax.random.key(2), (2, 1, D_MODEL), jnp.float32)
    docs, alone, tails, tail_lengths = alone_rows(x)
    segment_ids = jnp.asarray(SEGMENTS)

    @jax.jit
    def run(state):
        layer = nnx.merge(graphdef, state)
        packed, alone_y = layer(x, segment_ids=segment_ids), layer(alone)
        _, cache = layer.prefill(x, max_len=MAX_LEN, segment_ids=segment_ids)
        _, tail_cache = layer.prefill(tails, max_len=MAX_LEN, lengths=tail_lengths)
        step, _ = layer.decode(x_next, cache, tail_lengths)
        tail_step, _ = layer.decode(x_next, tail_cache, tail_lengths)
        return packed, alone_y, step, tail_step

    packed, alone_y, step, tail_step = run(state)
    scale = float(jnp.max(jnp.abs(alone_y)))
    for i, (row, start, length) in enumerate(docs):
        np.testing.assert_allclose(packed[row, start:start + length], alone_y[i, :length], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(step, tail_step, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(tail_step))))
