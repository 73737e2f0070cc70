"""Packed documents in the layers: short convolutions keep documents apart, RoPE follows `positions`,
and a packed prompt's tail is its last document (hybrid_jax.nn.segments)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.nn import ShortConv, build_mixer
from hybrid_jax.nn.segments import prompt_tail, segment_positions

# Two rows of T = 11: documents of 4, 1 and 2 tokens then padding; documents of 2 and 9 tokens.
SEGMENTS = np.array([[1, 1, 1, 1, 2, 3, 3, 0, 0, 0, 0],
                     [1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]], np.int32)


def documents(row):
    """(start, length) of each document of a row of SEGMENTS."""
    ids = SEGMENTS[row]
    return [(int(np.argmax(ids == i)), int(np.sum(ids == i))) for i in range(1, ids.max() + 1)]


def test_positions_and_tail_of_a_packed_prompt():
    positions = segment_positions(jnp.asarray(SEGMENTS))
    np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 0, 0, 1, 0, 0, 0, 0], [0, 1, *range(9)]])
    tail = prompt_tail(jnp.asarray(SEGMENTS))
    np.testing.assert_array_equal(tail.keep, SEGMENTS == SEGMENTS.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(tail.end, [2, 9])  # the next position of the last document
    np.testing.assert_array_equal(tail.lengths, [7, 11])  # last real token + 1


def test_short_conv_with_segments_equals_each_document_alone():
    conv = ShortConv(3, kernel_size=4, activation_name="identity", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 3)), jnp.float32)
    y, state = conv(x, segment_ids=jnp.asarray(SEGMENTS), lengths=prompt_tail(jnp.asarray(SEGMENTS)).lengths)
    unpacked, _ = conv(x)
    assert not np.allclose(y, unpacked, atol=1e-3)  # the documents do mix without segment ids
    for row in range(2):
        for start, length in documents(row):
            alone, alone_state = conv(x[row:row + 1, start:start + length])
            np.testing.assert_allclose(y[row, start:start + length], alone[0], rtol=1e-6, atol=1e-6)
        # the state a decode continues from: the last document's last W-1 inputs, zero before it
        # (row 0's last document has 2 < W-1 tokens)
        np.testing.assert_allclose(state[row], alone_state[0], rtol=0, atol=0)


def test_rope_rotates_by_the_given_positions():
    layer = build_mixer({"kind": "attention", "num_heads": 2, "num_kv_heads": 1, "impl": "reference"}, 16,
                        rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    run = jax.jit(lambda state, x, **documents: nnx.merge(graphdef, state)(x, **documents))
    layer = lambda x, **documents: run(state, x, **documents)  # noqa: E731
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 16)), jnp.float32)
    segment_ids = jnp.asarray(SEGMENTS)
    default = layer(x, segment_ids=segment_ids)  # positions within the documents
    within = segment_positions(segment_ids)
    np.testing.assert_array_equal(layer(x, segment_ids=segment_ids, positions=within), default)
    # RoPE scores depend on relative positions only: a shift per document changes nothing ...
    shifted = within + jnp.asarray(SEGMENTS) * 7
    np.testing.assert_allclose(layer(x, segment_ids=segment_ids, positions=shifted), default, rtol=1e-5, atol=1e-5)
    # ... other positions do, and without segments the positions are 0 .. T - 1
    assert not np.allclose(layer(x, segment_ids=segment_ids, positions=within * 2), default, atol=1e-3)
    np.testing.assert_array_equal(layer(x, positions=jnp.broadcast_to(jnp.arange(11), (2, 11))), layer(x))
