r"""Block-sparse attention layers: MoBA-style top-k blocks (`block_sparse`) and NSA (`nsa`).

With H query heads, HKV key/value heads (H % HKV == 0) and head dim Dh, for x `[B, T, d_model]`:

    q = rope(x W_q)  [B, T, H, Dh],   k = rope(x W_k)  [B, T, HKV, Dh],   v = x W_v  [B, T, HKV, Dh]
    o = block_sparse_attention(q, k, v, block_size, top_k)       (hybrid_jax.ops.sparse_attention)
    y = o W_o

Each token attends causally to its own block of `block_size` = Bs tokens and to the `top_k` earlier
blocks whose mean (rotated) key scores highest against the summed queries of its head group; the
heads of a group share the selection. Attention cost per token is (top_k + 1) Bs keys instead of
the whole context, plus the scoring of the t / Bs pooled keys. `top_k >= T / Bs` is dense causal
attention.

Decoding. The cache is `BlockSparseCache(k, v, block_keys)`: keys (after RoPE) and values
`[B, S, HKV, Dh]` in the compute dtype, position p in slot p, with S = max_len rounded up to a whole
number of blocks; and the pooled keys of the complete blocks, `[B, S / Bs, HKV, Dh]` in float32 (the
precision the selection computes in, so decoding selects exactly the blocks the forward selects). A
decode step writes the token's k, v, pools the block it completes (`block_keys_update`), scores the
pooled keys and attends over its (top_k + 1) Bs keys (`block_sparse_attention_step`).
Per sequence of N tokens, with N' = N rounded up to whole blocks: 2 HKV Dh N' elements plus
HKV Dh N' / Bs float32 pooled keys.

`nsa` (Native Sparse Attention, Yuan et al. 2025) adds to this selected branch a compressed and a
sliding-window branch, each with its own keys and values, mixed by per-head sigmoid gates:

    k^win, v^win, k^src, v^src = x W_kv  (four [B, T, HKV, Dh]; RoPE on k^win)
    kc_c = sum_j w^k_j k^src_{c Bs + j},  vc_c likewise with w^v      (one token per block)
    o_cmp = block_token_attention(q, kc, vc)       (complete blocks before the query's own)
    o_slc = block_sparse_attention(q, k, v),   o_win = softmax_attention(q, k^win, v^win, window=W)
    g = sigmoid(x W_g) [B, T, H, 3],   y = (g_cmp o_cmp + g_slc o_slc + g_win o_win) W_o

Two simplifications of the paper, both named: the compression phi is linear (learned position
weights w over a block, initialised to the mean) rather than an MLP, with compression blocks equal
to the selection blocks (l = l' = d = Bs); and the selected branch is the shared op above, which
ranks blocks by the group's summed query against mean-pooled keys rather than by the compressed
branch's attention probabilities. Its cache adds the window's ring buffer, the compressed tokens and
the open block's sources (`NSACache`).

Packed documents (`segment_ids`, `hybrid_jax.nn.segments`): every branch keeps documents apart, the
blocks (selected and compressed) counting from each document's first token (`block_grid` of the op),
and a packed prefill caches the last document, its blocks counted from its start as the op counts them.

Context parallelism (`hybrid_jax.nn.context`: inside `sharded_mixer` the layer sees its shard of T
tokens, T a multiple of Bs, and `positions` of the whole row): every op gets `context_axis` (the
selected branch and NSA's window branch gather or exchange keys themselves, the window through a
halo when W - 1 <= T). NSA's compressed tokens: without segment ids a shard's T / Bs absolute blocks
are its own, so it compresses them locally and the op gathers the T / Bs tokens of every shard; with
segment ids a document's blocks may straddle shards, so the compression sources and ids are
all-gathered, every shard compresses the whole row and keeps its T / Bs slots of the token table
(2 (n - 1) T HKV Dh more elements sent per shard).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import check_choice, fail
from hybrid_jax.nn.common import Dense, logical_param
from hybrid_jax.nn.context import context_axis, context_option
from hybrid_jax.nn.kv_cache import KVCache, mean_attended_keys, prompt_ring_buffer, written_in_place
from hybrid_jax.nn.layer_config import check_heads, check_ints, check_optional_ints, heads_and_dim, impl_names
from hybrid_jax.nn.registry import Mixer, register_mixer
from hybrid_jax.nn.rope import apply_rope
from hybrid_jax.nn.segments import prompt_tail, resolve_positions, segment_option, segment_positions
from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import kv_cache_update, softmax_attention_step
from hybrid_jax.ops.context import gather_time, shard_index, shard_offset
from hybrid_jax.ops.sparse_attention import (
    SUPPORTED,
    block_grid,
    block_sparse_attention,
    block_token_attention,
    pool_block_keys,
)
from hybrid_jax.ops.sparse_attention_decode import block_keys_update, block_sparse_attention_step


class BlockSparseCache(NamedTuple):
    """Decode cache of a block-sparse attention layer (module docstring)."""

    k: jax.Array  # [B, S, HKV, Dh], after RoPE
    v: jax.Array  # [B, S, HKV, Dh]
    block_keys: jax.Array  # [B, S / block_size, HKV, Dh] float32, pooled keys of the complete blocks


def _kv_heads(cfg: ml_collections.ConfigDict) -> int:
    return cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_heads


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`[B, T, N, D]` -> `[B, ceil(T / Bs), Bs, N, D]`, zero padded."""
    b, t, n, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, -t % block_size), (0, 0), (0, 0)))
    return x.reshape(b, -1, block_size, n, d)


def mean_sparse_keys(context: int, block_size: int, top_k: int) -> tuple[float, float]:
    """(pooled keys scored, keys attended) per token, averaged over positions t = 0 .. N - 1:
    t // Bs complete blocks scored; (t mod Bs) + 1 own-block keys plus Bs per selected block."""
    t = np.arange(int(context))
    blocks = t // block_size
    attended = t % block_size + 1 + block_size * np.minimum(blocks, top_k)
    return float(blocks.mean()), float(attended.mean())


@register_mixer("block_sparse")
class BlockSparseAttention(Mixer):
    """Causal block-sparse softmax attention with grouped key/value heads (module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 8,
                "num_kv_heads": config_dict.placeholder(int),  # None: num_heads; fewer: GQA (shared selection)
                "head_dim": config_dict.placeholder(int),  # None: d_model // num_heads
                "block_size": 64,  # keys per block: the unit of selection
                "top_k": 8,  # earlier blocks each token reads besides its own
                "rope": True,  # False: NoPE
                "rope_theta": 10000.0,
                "impl": "chunk",  # "chunk": gathered blocks; "reference": dense masked
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_optional_ints(cfg, "num_kv_heads")
        check_ints(cfg, "block_size", "top_k")
        if cfg.num_heads % _kv_heads(cfg):
            fail("num_kv_heads", f"{cfg.num_kv_heads} must divide num_heads={cfg.num_heads} (grouped-query heads)")
        if cfg.rope and heads_and_dim(cfg, d_model)[1] % 2:
            fail("head_dim", f"{heads_and_dim(cfg, d_model)[1]} must be even for RoPE (it rotates pairs); "
                             f"or use rope=False")
        check_choice(cfg, "impl", impl_names(SUPPORTED))

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        """What `prefill(max_len=context)` allocates: k and v for whole blocks, float32 pooled keys."""
        width = _kv_heads(cfg) * heads_and_dim(cfg, d_model)[1]
        blocks = -(-context // cfg.block_size)
        return blocks * width * (2 * cfg.block_size * dtype_bytes + 4)

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        head_dim = heads_and_dim(cfg, d_model)[1]
        heads, kv_heads = cfg.num_heads, _kv_heads(cfg)
        projections = 2 * d_model * head_dim * (heads + kv_heads)  # q and o; k and v
        scored, attended = mean_sparse_keys(context, cfg.block_size, cfg.top_k)
        selection = (heads + kv_heads * scored) * head_dim  # the group sums, then q . kbar
        return int(round(2 * (projections + selection + 2 * heads * head_dim * attended)))

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, kv_heads, head_dim = cfg.num_heads, _kv_heads(cfg), heads_and_dim(cfg, d_model)[1]
        self.block_size, self.top_k, self.impl = cfg.block_size, cfg.top_k, cfg.impl
        self.rope_theta = cfg.rope_theta if cfg.rope else None
        self.q_proj = Dense(d_model, (heads, head_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.k_proj = Dense(d_model, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), rngs=rngs)
        self.v_proj = Dense(d_model, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), rngs=rngs)
        self.o_proj = Dense((heads, head_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, H, Dh]`, k, v `[B, T, HKV, Dh]` for tokens at `positions` (`[T]` or `[B, T]`)."""
        q, k = self.q_proj(x), self.k_proj(x)
        if self.rope_theta is not None:
            q, k = (apply_rope(a, positions, theta=self.rope_theta) for a in (q, k))
        return q, k, self.v_proj(x)

    def _options(self) -> dict:
        return dict(block_size=self.block_size, top_k=self.top_k)

    def attend(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer output `[B, T, d_model]` over a whole sequence, and its k, v."""
        q, k, v = self._qkv(x, resolve_positions(x.shape[1], segment_ids, positions))
        o = block_sparse_attention(q, k, v, impl=self.impl, **self._options(), **segment_option(segment_ids),
                                   **context_option())
        return self.o_proj(o), k, v

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.attend(x, segment_ids=segment_ids, positions=positions)[0]

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """Output over the prompt x `[B, T, d_model]` and the cache for decoding up to `max_len` tokens
        (of the last document only, given `segment_ids`)."""
        y, k, v = self.attend(x, segment_ids=segment_ids, positions=positions)
        slots = -(-max_len // self.block_size) * self.block_size
        tail = None if segment_ids is None else prompt_tail(segment_ids, positions)
        k_cache, v_cache = (prompt_ring_buffer(a, slots, lengths, tail) for a in (k, v))
        # The partly filled block pools a partial mean; it is pooled again when decoding completes it.
        return y, BlockSparseCache(k_cache, v_cache, pool_block_keys(k_cache, block_size=self.block_size))

    def decode_limit(self, cache: BlockSparseCache) -> int:
        """Position p lives in slot p: the cache holds its S slots' positions and no more."""
        return cache.k.shape[-3]  # [..., B, S, HKV, Dh]

    def _decode_attend(self, x: jax.Array, cache: BlockSparseCache, position: jax.Array):
        """q `[B, 1, H, Dh]`, the attention output `[B, 1, H, Dh]` and the cache after one token."""
        q, k, v = self._qkv(x, position[:, None])
        k_cache, v_cache = written_in_place(kv_cache_update(cache.k, cache.v, k[:, 0], v[:, 0], position))
        length = position + 1
        block_keys = block_keys_update(cache.block_keys, k_cache, length, block_size=self.block_size)
        o = block_sparse_attention_step(q[:, 0], k_cache, v_cache, block_keys, length=length, **self._options())
        return q, o[:, None], BlockSparseCache(k_cache, v_cache, block_keys)

    def decode(self, x: jax.Array, cache: BlockSparseCache, position: jax.Array):
        """One token per row: x `[B, 1, d_model]` at positions `position` `[B]`."""
        _, o, cache = self._decode_attend(x, cache, position)
        return self.o_proj(o), cache


class BlockCompression(nnx.Module):
    """NSA's block compression phi, here linear: token_c = sum_j w_j x_{c Bs + j} over a block's Bs
    positions (w initialised to the mean; learned weights act as the intra-block position code)."""

    def __init__(self, block_size: int):
        self.weight = logical_param(jnp.full((block_size,), 1.0 / block_size), ("conv",), role="weight")

    def __call__(self, blocks: jax.Array) -> jax.Array:
        """`[B, NB, Bs, N, D]` -> one token per block `[B, NB, N, D]`."""
        return jnp.einsum("bcjnd,j->bcnd", blocks, self.weight[...].astype(blocks.dtype))


class NSACache(NamedTuple):
    """Decode cache of an NSA layer: the selected branch's, the window's ring buffer, the compressed
    tokens of the complete blocks and the open block's compression sources (slot p mod Bs)."""

    sparse: BlockSparseCache
    window: KVCache  # [B, min(W, S), HKV, Dh]
    tokens: KVCache  # [B, S / Bs, HKV, Dh]
    open_block: KVCache  # [B, Bs, HKV, Dh]


@register_mixer("nsa")
class NativeSparseAttention(BlockSparseAttention):
    """NSA: gated compressed + selected + sliding-window attention (module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        cfg = super().default_config()
        cfg.window = 64  # the sliding-window branch's last W tokens
        return cfg

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_ints(cfg, "window")

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        width = _kv_heads(cfg) * heads_and_dim(cfg, d_model)[1]
        blocks = -(-context // cfg.block_size)
        extra = min(cfg.window, blocks * cfg.block_size) + blocks + cfg.block_size  # window, tokens, open block
        return super().cache_bytes(cfg, d_model, context, dtype_bytes) + 2 * width * extra * dtype_bytes

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        heads, head_dim = cfg.num_heads, heads_and_dim(cfg, d_model)[1]
        width = _kv_heads(cfg) * head_dim
        scored = mean_sparse_keys(context, cfg.block_size, cfg.top_k)[0]  # = the compressed tokens read
        keys = scored + mean_attended_keys(context, cfg.window)  # compressed and window branches
        extra = 4 * d_model * width + 3 * d_model * heads + 2 * width + 2 * heads * head_dim * keys
        return super().flops_per_token(cfg, d_model, context) + int(round(2 * extra))

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, d_model, rngs=rngs)
        heads, kv_heads, head_dim = cfg.num_heads, _kv_heads(cfg), heads_and_dim(cfg, d_model)[1]
        self.window = cfg.window
        # Each branch has its own keys and values (NSA: shared ones let one branch shortcut the others).
        self.branch_kv = Dense(d_model, (4, kv_heads, head_dim), ("embed", None, "kv_heads", "kv"), rngs=rngs)
        self.compress_k, self.compress_v = BlockCompression(cfg.block_size), BlockCompression(cfg.block_size)
        self.gate = Dense(d_model, (heads, 3), ("embed", "heads", None), rngs=rngs)

    def _branch_kv(self, x, positions):
        """(window k, v) with RoPE on k, and the compression sources (k, v), each `[B, T, HKV, Dh]`."""
        k_win, v_win, k_src, v_src = (self.branch_kv(x)[:, :, i] for i in range(4))
        if self.rope_theta is not None:
            k_win = apply_rope(k_win, positions, theta=self.rope_theta)
        return (k_win, v_win), (k_src, v_src)

    def _combine(self, x, q, o_slc, o_win, tokens, positions, documents=None):
        """y = W_o (g_cmp o_cmp + g_slc o_slc + g_win o_win), gates g = sigmoid(x W_g) per head."""
        o_cmp = block_token_attention(q, *tokens, positions=positions, block_size=self.block_size, **(documents or {}))
        gates = jax.nn.sigmoid(self.gate(x))[..., None]  # [B, T, H, 3, 1]
        o = gates[..., 0, :] * o_cmp + gates[..., 1, :] * o_slc + gates[..., 2, :] * o_win
        return self.o_proj(o)

    def _forward(self, x, segment_ids=None, positions=None):
        b, t = x.shape[:2]
        positions = resolve_positions(t, segment_ids, positions)
        q, k, v = self._qkv(x, positions)
        (k_win, v_win), sources = self._branch_kv(x, positions)
        documents = dict(segment_option(segment_ids), **context_option())
        o_slc = block_sparse_attention(q, k, v, impl=self.impl, **self._options(), **documents)
        o_win = softmax_attention(q, k_win, v_win, window=self.window, **documents)
        tokens, block_positions = self._compressed_tokens(sources, segment_ids)
        y = self._combine(x, q, o_slc, o_win, tokens, jnp.broadcast_to(block_positions, (b, t)), documents)
        return y, (k, v), (k_win, v_win), sources

    def _compressed_tokens(self, sources, segment_ids):
        """The compressed (k, v) tokens of this shard's slots of the token table (all of them without
        context parallelism), and each token's position for the block count: blocks count from each
        document's first token, whatever positions RoPE rotates by (module docstring)."""
        axis, t = context_axis(), sources[0].shape[1]
        compress = (self.compress_k, self.compress_v)
        if axis is None:
            tokens = tuple(c(self._compression_blocks(a, segment_ids)) for c, a in zip(compress, sources))
            return tokens, jnp.arange(t) if segment_ids is None else segment_positions(segment_ids)
        if segment_ids is None:  # the shard's absolute blocks are its own: whole, as T % Bs == 0
            tokens = tuple(c(_blocks(a, self.block_size)) for c, a in zip(compress, sources))
            return tokens, shard_offset(t, axis) + jnp.arange(t)
        # A document's blocks may straddle shards: compress the whole row, keep this shard's slots.
        ids, slots = gather_time(segment_ids, axis), t // self.block_size
        tokens = tuple(jax.lax.dynamic_slice_in_dim(c(self._compression_blocks(gather_time(a, axis), ids)),
                                                    shard_index(axis) * slots, slots, axis=1)
                       for c, a in zip(compress, sources))
        return tokens, jax.lax.dynamic_slice_in_dim(segment_positions(ids), shard_offset(t, axis), t, axis=1)

    def _compression_blocks(self, source: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """`[B, NB, Bs, HKV, Dh]`: the sources of each block; with segment ids the complete blocks of
        each document from its first token, in the order `block_token_attention` numbers them."""
        if segment_ids is None:
            return _blocks(source, self.block_size)
        b, t = source.shape[:2]
        grid = block_grid(segment_ids, batch=b, time=t, block_size=self.block_size)
        keys = grid.block_start[:, :, None] + jnp.arange(self.block_size)  # [B, NB, Bs]; unused slots: never read
        return jnp.take_along_axis(source, jnp.minimum(keys, t - 1).reshape(b, -1)[:, :, None, None], axis=1
                                   ).reshape(b, *keys.shape[1:], *source.shape[2:])

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self._forward(x, segment_ids, positions)[0]

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """Output over the prompt and the cache (of its last document, given `segment_ids`); tokens of
        blocks the prompt leaves open (or fills with padding) are compressed again when decoding
        completes them."""
        y, (k, v), window, sources = self._forward(x, segment_ids, positions)
        slots = -(-max_len // self.block_size) * self.block_size
        tail = None if segment_ids is None else prompt_tail(segment_ids, positions)
        k_cache, v_cache = (prompt_ring_buffer(a, slots, lengths, tail) for a in (k, v))
        sparse = BlockSparseCache(k_cache, v_cache, pool_block_keys(k_cache, block_size=self.block_size))
        window = KVCache(*(prompt_ring_buffer(a, min(self.window, slots), lengths, tail) for a in window))
        blocks = [_blocks(prompt_ring_buffer(a, slots, lengths, tail), self.block_size) for a in sources]
        tokens = KVCache(self.compress_k(blocks[0]), self.compress_v(blocks[1]))
        open_block = KVCache(*(prompt_ring_buffer(a, self.block_size, lengths, tail) for a in sources))
        return y, NSACache(sparse, window, tokens, open_block)

    def decode_limit(self, cache: NSACache) -> int:
        """The selected branch's S slots; the window ring holds min(W, S) of them."""
        return cache.sparse.k.shape[-3]

    def _decode_tokens(self, cache: NSACache, sources, position: jax.Array) -> tuple[KVCache, KVCache]:
        """Writes the token's compression sources into the open block; a row whose block that token
        completes compresses it into its token slot. Returns (tokens, open_block)."""
        slot = position % self.block_size
        open_block = KVCache(*kv_cache_update(*cache.open_block, sources[0][:, 0], sources[1][:, 0], slot))
        done = jnp.where(slot == self.block_size - 1, position // self.block_size, cache.tokens.k.shape[1])
        rows, compress = jnp.arange(position.shape[0]), (self.compress_k, self.compress_v)
        tokens = KVCache(*(t.at[rows, done].set(c(o[:, None])[:, 0], mode="drop")  # out of range: dropped
                           for t, c, o in zip(cache.tokens, compress, open_block)))
        return tokens, open_block

    def decode(self, x: jax.Array, cache: NSACache, position: jax.Array):
        """One token per row: x `[B, 1, d_model]` at positions `position` `[B]`."""
        q, o_slc, sparse = self._decode_attend(x, cache.sparse, position)
        (k_win, v_win), sources = self._branch_kv(x, position[:, None])
        capacity = cache.window.k.shape[1]
        window = KVCache(*written_in_place(kv_cache_update(*cache.window, k_win[:, 0], v_win[:, 0],
                                                           position % capacity)))
        length = jnp.minimum(position + 1, capacity)
        o_win = softmax_attention_step(q[:, 0], *window, length=length, window=self.window)
        tokens, open_block = self._decode_tokens(cache, sources, position)
        y = self._combine(x, q, o_slc, o_win[:, None], tokens, position[:, None])
        return y, NSACache(sparse, window, tokens, open_block)
