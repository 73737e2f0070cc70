"""Every mixer kind: prefill + per-token decode equals the training forward (T = 1, odd T, ragged)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import MIXERS, build_mixer, mixer_config
from hybrid_jax.nn.kv_cache import KVCache
from hybrid_jax.nn.linear_mixer import RecurrentCache
from hybrid_jax.nn.lolcats import LolcatsCache
from hybrid_jax.nn.mla import LatentCache
from hybrid_jax.nn.sparse_attention import BlockSparseCache
from hybrid_jax.ops.log_linear import FenwickState
from tests.inference.helpers import B, RAGGED, TOTAL, check_decoding, init_fast

D_MODEL = 32
# chunk_size 4: the odd prompt (5) spans two chunks, the full sequence (11) three, the last ragged.
# Log-linear layers: lambda has 7 levels (max_seq_len 64), the cache for max_len 11 keeps 5.
VARIANTS = {
    "attention": ("attention", dict(num_heads=4, num_kv_heads=2, rope_fraction=0.5, qk_norm=True)),
    "attention_window": ("attention", dict(num_heads=4, num_kv_heads=1, window=3)),  # ring buffer of 3
    # 11 tokens in blocks of 2: decoding selects 2 of up to 4 earlier blocks and completes blocks.
    "block_sparse": ("block_sparse", dict(num_heads=4, num_kv_heads=2, block_size=2, top_k=2)),
    "nsa": ("nsa", dict(num_heads=4, num_kv_heads=2, block_size=2, top_k=2, window=3)),  # ring buffer of 3
    "mla_rope": ("mla", dict(num_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8,
                             qk_rope_head_dim=4, v_head_dim=6)),
    "mla_nope": ("mla", dict(num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=0, v_head_dim=8)),
    "linear_attention": ("linear_attention", dict(num_heads=2, feature_map="hedgehog", output_norm="denominator",
                                                  chunk_size=4)),
    "gla": ("gla", dict(num_heads=2, gate_low_rank_dim=4, chunk_size=4)),
    "mamba": ("mamba", dict(expand=1, state_dim=4, chunk_size=4)),
    "mamba2": ("mamba2", dict(expand=1, head_dim=8, state_dim=8, num_groups=2, chunk_size=4)),
    "deltanet": ("deltanet", dict(num_heads=2, chunk_size=4)),
    "gated_deltanet": ("gated_deltanet", dict(num_heads=2, num_v_heads=4, expand_v=1.0, chunk_size=4)),
    "kda": ("kda", dict(num_heads=2, num_v_heads=4, gate_low_rank_dim=4, chunk_size=4)),
    "loglinear_mamba2": ("loglinear_mamba2", dict(expand=1, head_dim=8, state_dim=8, num_groups=2,
                                                  max_seq_len=64, chunk_size=4)),
    "loglinear_gated_deltanet": ("loglinear_gated_deltanet", dict(num_heads=2, expand_v=1.0, max_seq_len=64,
                                                                  chunk_size=4)),
    "loglinear_kda": ("loglinear_kda", dict(num_heads=2, num_v_heads=4, gate_low_rank_dim=4, max_seq_len=64,
                                            chunk_size=4)),
    "rg_lru": ("rg_lru", dict(num_heads=2, expand=1.5, chunk_size=4)),
    "qla": ("qla", dict(num_heads=2, chunk_size=4)),  # (no candidates here: tests/nn/test_qla.py has them)
    # window 3 of 11 tokens: decoding folds each token leaving the window into the linear state
    "lolcats": ("lolcats", dict(num_heads=4, num_kv_heads=2, window=3, feature_dim=6, chunk_size=4)),
}


def test_every_registered_kind_has_a_variant():
    assert {kind for kind, _ in VARIANTS.values()} == set(MIXERS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_then_decode_equals_forward(name):
    kind, overrides = VARIANTS[name]
    layer = init_fast(lambda: build_mixer(mixer_config(kind, **overrides), D_MODEL, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (B, TOTAL, D_MODEL), jnp.float32)
    cache = check_decoding(layer, x)

    # The cache is the documented structure, sized for max_len = TOTAL tokens.
    if kind == "attention":
        capacity = min(TOTAL, overrides.get("window") or TOTAL)
        assert isinstance(cache, KVCache) and cache.k.shape[:2] == (B, capacity)
    elif kind in ("block_sparse", "nsa"):  # slots for max_len rounded up to whole blocks, one pooled key each
        sparse = cache if kind == "block_sparse" else cache.sparse
        assert isinstance(sparse, BlockSparseCache) and sparse.k.shape[:2] == (B, 12)
        assert sparse.block_keys.shape == (B, 6, 2, 8) and sparse.block_keys.dtype == jnp.float32
        if kind == "nsa":  # the window's ring, a compressed token per block, the open block's sources
            assert [c.k.shape[1] for c in cache[1:]] == [3, 6, 2]
    elif kind == "lolcats":  # constant memory: the linear state and a ring of exactly `window` slots
        assert isinstance(cache, LolcatsCache) and cache.window.k.shape[:2] == (B, 3)
        assert cache.state.shape == (B, 4, 12, 9) and cache.state.dtype == jnp.float32
    elif kind == "mla":
        assert isinstance(cache, LatentCache)
        assert cache.latent.shape == (B, TOTAL, 1, overrides["kv_lora_rank"] + overrides["qk_rope_head_dim"])
    else:
        assert isinstance(cache, RecurrentCache)
        if kind.startswith("loglinear"):
            assert isinstance(cache.state, FenwickState)
            assert cache.state.levels.shape[2] == 5  # num_levels(11) = ceil(log2 11) + 1, not lambda's 7
            np.testing.assert_array_equal(cache.state.position, RAGGED + TOTAL - RAGGED.max())
