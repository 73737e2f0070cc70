r"""Multi-head Latent Attention (DeepSeek-V2 / V3), with the NoPE variant used by Kimi Linear.

Keys and values are generated from a small shared latent, so decoding caches only the latent:

    c_KV  = RMSNorm(x W_DKV)                       [B, T, r_kv]      (kv_lora_rank)
    k^C   = c_KV W_UK,   v = c_KV W_UV             [B, T, H, d_nope], [B, T, H, d_v]
    k^R   = rope(x W_KR)                           [B, T, 1, d_rope]  one key shared by all heads
    q     = x W_Q  or  RMSNorm(x W_DQ) W_UQ        [B, T, H, d_nope + d_rope]   (q_lora_rank = 0 or r_q)
    q     = [q^C ; rope(q^R)],   k = [k^C ; k^R broadcast over heads]
    o     = softmax_attention(q, k, v)  with scale (d_nope + d_rope)^-1/2,     y = o W_O

The training path materialises per-head k and v and calls the softmax attention op. Decoding can
instead absorb W_UK into the query and W_UV into W_O and attend over the cached [c_KV ; k^R] directly,
which is why the cache per token is r_kv + d_rope elements, independent of H.

NoPE (`qk_rope_head_dim = 0`): no decoupled rope key at all; positions come only from causality and,
in Kimi Linear, from the KDA layers around it. The cache is then r_kv elements per token.

Decoding caches `LatentCache(latent)`, `[B, S, 1, r_kv + d_rope]` = [c_KV ; k^R] per token (S =
max_len, compute dtype). `prefill` runs the training path over the prompt and keeps its latents;
`decode` absorbs the up-projections and never forms a per-head key or value:

    q^L_h = W_UK[:, h, :] q^C_h                                  [B, H, r_kv]
    s_h,j = (q^L_h . c_j + rope(q^R_h) . k^R_j) (d_nope + d_rope)^-1/2
    o^L_h = sum_j softmax_j(s_h,j) [c_j ; k^R_j],   o_h = W_UV[:, h, :]^T o^L_h[:r_kv]

i.e. multi-query attention of the H latent queries over the one cached latent "head", the cache
serving as both keys and values (the k^R columns of o^L are dropped; FlashMLA's layout).

Packed documents: `segment_ids` keep documents apart and RoPE rotates by `positions` (default: the
position within each document), as in the attention layer; a packed prefill caches the last document.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_jax.checks import fail
from hybrid_jax.nn.common import Dense
from hybrid_jax.nn.kv_cache import check_attention_impl, mean_attended_keys, prompt_ring_buffer, written_in_place
from hybrid_jax.nn.layer_config import check_ints
from hybrid_jax.nn.norms import RMSNorm
from hybrid_jax.nn.registry import Mixer, register_mixer
from hybrid_jax.nn.rope import apply_rope
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import prompt_tail, resolve_positions, segment_option
from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import softmax_attention_step


class LatentCache(NamedTuple):
    """Decode cache of an MLA layer: [c_KV ; k^R] per token, one shared latent "head"."""

    latent: jax.Array  # [B, S, 1, kv_lora_rank + qk_rope_head_dim]


@register_mixer("mla")
class MLA(Mixer):
    """Multi-head latent attention (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 8,
                "q_lora_rank": 0,  # 0: direct query projection (DeepSeek-V2-Lite, Kimi Linear)
                "kv_lora_rank": 128,
                "qk_nope_head_dim": 64,
                "qk_rope_head_dim": 32,  # 0: NoPE
                "v_head_dim": 64,
                "rope_theta": 10000.0,
                "impl": "chunk",
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_ints(cfg, "num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
        check_ints(cfg, "q_lora_rank", "qk_rope_head_dim", minimum=0)
        if cfg.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {cfg.qk_rope_head_dim}")
        check_attention_impl(cfg)
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.impl == "xla" and qk_dim != cfg.v_head_dim:
            fail("impl", f"'xla' needs qk_nope_head_dim + qk_rope_head_dim ({qk_dim}) == v_head_dim "
                         f"({cfg.v_head_dim}); use impl='chunk'")

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context * dtype_bytes

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        heads, qk_dim = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            query = d_model * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk_dim
        else:
            query = d_model * heads * qk_dim
        key_value = d_model * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim
        )
        output = heads * cfg.v_head_dim * d_model
        mixing = heads * (qk_dim + cfg.v_head_dim) * mean_attended_keys(context, None)
        return int(round(2 * (query + key_value + output + mixing)))

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads = cfg.num_heads
        self.num_heads, self.kv_lora_rank, self.q_lora_rank = heads, cfg.kv_lora_rank, cfg.q_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rope_theta, self.impl = cfg.rope_theta, cfg.impl
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.q_down = Dense(d_model, self.q_lora_rank, ("embed", "latent"), rngs=rngs)
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.q_up = Dense(self.q_lora_rank, (heads, qk_dim), ("latent", "heads", "kv"), rngs=rngs)
        else:
            self.q_proj = Dense(d_model, (heads, qk_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.kv_down = Dense(d_model, self.kv_lora_rank, ("embed", "latent"), rngs=rngs)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.k_up = Dense(self.kv_lora_rank, (heads, self.nope_dim), ("latent", "heads", "kv"), rngs=rngs)
        self.v_up = Dense(self.kv_lora_rank, (heads, self.v_dim), ("latent", "heads", "kv"), rngs=rngs)
        self.k_rope = Dense(d_model, self.rope_dim, ("embed", "kv"), rngs=rngs) if self.rope_dim else None
        self.o_proj = Dense((heads, self.v_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def query(self, x: jax.Array) -> jax.Array:
        """The un-rotated query `[B, T, H, d_nope + d_rope]`."""
        if self.q_lora_rank:
            return self.q_up(self.q_norm(self.q_down(x)))
        return self.q_proj(x)

    def latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """What decoding caches: c_KV `[B, T, r_kv]` and the rotated shared key k^R `[B, T, 1, d_rope]`."""
        c_kv = self.kv_norm(self.kv_down(x))
        if self.k_rope is None:
            return c_kv, None
        k_pe = apply_rope(self.k_rope(x)[:, :, None, :], positions, theta=self.rope_theta)
        return c_kv, k_pe

    def rotate_query(self, q: jax.Array, positions: jax.Array) -> jax.Array:
        """[q^C ; rope(q^R)] for q `[B, T, H, d_nope + d_rope]` at `positions` (`[T]` or `[B, T]`)."""
        if not self.rope_dim:
            return q
        q_pe = apply_rope(q[..., self.nope_dim :], positions, theta=self.rope_theta)
        return jnp.concatenate([q[..., : self.nope_dim], q_pe], axis=-1)

    def cache_entries(self, c_kv: jax.Array, k_pe: jax.Array | None) -> jax.Array:
        """[c_KV ; k^R] `[B, T, 1, r_kv + d_rope]`: what the cache holds per token."""
        entries = c_kv[:, :, None, :]
        return entries if k_pe is None else jnp.concatenate([entries, k_pe], axis=-1)

    def attend(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The layer output over a whole sequence (per-head k, v materialised) and its cache entries;
        packed documents (`segment_ids`) never attend across, RoPE rotates by `positions`."""
        positions = resolve_positions(x.shape[1], segment_ids, positions)
        q = self.rotate_query(self.query(x), positions)
        c_kv, k_pe = self.latent(x, positions)
        k, v = self.k_up(c_kv), self.v_up(c_kv)
        if k_pe is not None:
            k = jnp.concatenate([k, jnp.broadcast_to(k_pe, k.shape[:3] + (self.rope_dim,))], axis=-1)
        o = softmax_attention(q, k, v, causal=True, impl=self.impl, **segment_option(segment_ids),
                              **context_option())
        return self.o_proj(o), self.cache_entries(c_kv, k_pe)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.attend(x, segment_ids=segment_ids, positions=positions)[0]

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None,
                positions: jax.Array | None = None) -> tuple[jax.Array, LatentCache]:
        """Output over the prompt x `[B, T, d_model]` and the latent cache for up to `max_len` tokens
        (of the last document only, given `segment_ids`)."""
        y, entries = self.attend(x, segment_ids=segment_ids, positions=positions)
        tail = None if segment_ids is None else prompt_tail(segment_ids, positions)
        return y, LatentCache(prompt_ring_buffer(entries, max_len, lengths, tail))

    def decode_limit(self, cache: LatentCache) -> int:
        """The latent ring buffer of S slots would overwrite position p - S at position p."""
        return cache.latent.shape[-3]  # [..., B, S, 1, r_kv + d_rope]

    def decode(self, x: jax.Array, cache: LatentCache, position: jax.Array) -> tuple[jax.Array, LatentCache]:
        """One token per row, x `[B, 1, d_model]` at `position` `[B]`, in the absorbed form (module doc)."""
        q = self.rotate_query(self.query(x), position[:, None])[:, 0]  # [B, H, d_nope + d_rope]
        entry = self.cache_entries(*self.latent(x, position[:, None]))[:, 0]
        latent = written_in_place(cache.latent.at[jnp.arange(x.shape[0]), position].set(entry, mode="drop"))
        w_uk, w_uv = self.k_up.kernel[...].astype(x.dtype), self.v_up.kernel[...].astype(x.dtype)
        q_latent = jnp.einsum("bhn,rhn->bhr", q[..., : self.nope_dim], w_uk)
        q_latent = jnp.concatenate([q_latent, q[..., self.nope_dim :]], axis=-1)
        o_latent = softmax_attention_step(
            q_latent, latent, latent, length=position + 1, scale=(self.nope_dim + self.rope_dim) ** -0.5
        )
        o = jnp.einsum("bhr,rhv->bhv", o_latent[..., : self.kv_lora_rank], w_uv)
        return self.o_proj(o[:, None]), LatentCache(latent)
