r"""Multi-head softmax attention layer: MHA / GQA / MQA, RoPE or NoPE, optional sliding window.

With H query heads, HKV key/value heads (H % HKV == 0; HKV = H is MHA, HKV = 1 is MQA) and head
dim Dh, for x `[B, T, d_model]`:

    q = rope(x W_q)  [B, T, H, Dh],   k = rope(x W_k)  [B, T, HKV, Dh],   v = x W_v  [B, T, HKV, Dh]
    o = softmax_attention(q, k, v, causal, window)          (hybrid_jax.ops.attention)
    y = o W_o,   W_o: [H, Dh, d_model]

`rope=False` gives NoPE (no position signal but causality, as in some hybrid stacks whose recurrent
layers carry position). `rope_fraction` < 1 rotates only the first fraction of each head (partial
rotary). `window=W` restricts each token to the last W tokens (sliding-window attention, e.g. Samba);
it also bounds the decode cache to W tokens. `qk_norm` applies a per-head RMSNorm to q and k before
RoPE (OLMo-2 / Qwen-3 style), which keeps logits bounded at scale. `qkv_bias` / `o_bias` add biases
to the projections and `lora_rank` > 0 puts LoRA adapters on them (`hybrid_jax.nn.lora`).

Decoding. The cache is `KVCache(k, v)`, each `[B, S, HKV, Dh]` in the compute dtype, a ring buffer of
S = min(max_len, W) slots (S = max_len without a window): position p lives in slot p mod S, so a
sliding-window layer keeps exactly its last W tokens and a global one its whole context. Keys are
cached after RoPE. `prefill` runs the training path over the prompt and writes its k, v into the
cache; `decode` writes one token's k, v and attends to the min(p + 1, S) filled slots (softmax does
not care about slot order). Per sequence: 2 * HKV * Dh * min(context, W) elements.

Packed documents: `segment_ids` `[B, T]` keep documents apart (a query attends keys of its own
document only) and RoPE rotates by `positions` (default: the position within each document); a
packed `prefill` caches only each row's last document (`hybrid_jax.nn.segments`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import check_number, fail
from hybrid_jax.nn.kv_cache import (
    KVCache,
    check_attention_impl,
    mean_attended_keys,
    prompt_ring_buffer,
    written_in_place,
)
from hybrid_jax.nn.layer_config import check_heads, check_optional_ints, heads_and_dim
from hybrid_jax.nn.lora import attention_projections, check_projection_config, projection_defaults
from hybrid_jax.nn.norms import RMSNorm
from hybrid_jax.nn.registry import Mixer, register_mixer
from hybrid_jax.nn.rope import apply_rope, rotary_dim_for
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import prompt_tail, resolve_positions, segment_option
from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import kv_cache_update, softmax_attention_step


def attention_kv_heads(cfg: ml_collections.ConfigDict) -> int:
    return cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_heads


@register_mixer("attention")
class Attention(Mixer):
    """Causal softmax attention with grouped key/value heads (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 8,
                "num_kv_heads": config_dict.placeholder(int),  # None: num_heads (MHA); fewer: GQA; 1: MQA
                "head_dim": config_dict.placeholder(int),  # None: d_model // num_heads
                "rope": True,  # False: NoPE
                "rope_theta": 10000.0,
                "rope_fraction": 1.0,  # share of each head's dims that RoPE rotates
                "window": config_dict.placeholder(int),  # None: global causal; W: last W tokens
                "qk_norm": False,
                "impl": "chunk",
                **projection_defaults(),  # biases and LoRA adapters (hybrid_jax.nn.lora); off by default
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_optional_ints(cfg, "num_kv_heads", "window")
        if cfg.num_heads % attention_kv_heads(cfg):
            fail("num_kv_heads", f"{cfg.num_kv_heads} must divide num_heads={cfg.num_heads} (grouped-query heads)")
        check_number(cfg, "rope_fraction", low=0, high=1)
        head_dim = heads_and_dim(cfg, d_model)[1]
        if cfg.rope and rotary_dim_for(head_dim, cfg.rope_fraction) == 0:
            fail("rope_fraction", f"{cfg.rope_fraction} rotates no dims of head_dim={head_dim}; "
                                  f"use rope=False for NoPE")
        check_attention_impl(cfg)
        check_projection_config(cfg)

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        tokens = context if cfg.window is None else min(context, cfg.window)
        return 2 * attention_kv_heads(cfg) * heads_and_dim(cfg, d_model)[1] * tokens * dtype_bytes

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        head_dim = heads_and_dim(cfg, d_model)[1]
        q_and_o = 2 * d_model * cfg.num_heads * head_dim
        k_and_v = 2 * d_model * attention_kv_heads(cfg) * head_dim
        scores_and_values = 2 * cfg.num_heads * head_dim * mean_attended_keys(context, cfg.window)
        return int(round(2 * (q_and_o + k_and_v + scores_and_values)))

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = cfg.num_heads, attention_kv_heads(cfg)
        self.head_dim = heads_and_dim(cfg, d_model)[1]
        self.rotary_dim = rotary_dim_for(self.head_dim, cfg.rope_fraction) if cfg.rope else 0
        self.rope_theta, self.window, self.impl = cfg.rope_theta, cfg.window, cfg.impl
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            cfg, d_model, heads, kv_heads, head_dim, rngs=rngs)
        self.q_norm = RMSNorm(head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim) if cfg.qk_norm else None

    def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, H, Dh]`, k, v `[B, T, HKV, Dh]` for tokens at `positions` (`[T]` or `[B, T]`)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_dim:
            q = apply_rope(q, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
            k = apply_rope(k, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
        return q, k, v

    def attend(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer output `[B, T, d_model]` over a whole sequence, and its k, v (what a cache holds).
        Packed documents (`segment_ids`) never attend across; RoPE rotates by `positions` (default:
        the positions within the documents, else 0 .. T - 1)."""
        q, k, v = self.project_qkv(x, resolve_positions(x.shape[1], segment_ids, positions))
        o = softmax_attention(q, k, v, causal=True, window=self.window, impl=self.impl,
                              **segment_option(segment_ids), **context_option())
        return self.o_proj(o), k, v

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.attend(x, segment_ids=segment_ids, positions=positions)[0]

    def cache_capacity(self, max_len: int) -> int:
        return max_len if self.window is None else min(self.window, max_len)

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Output over the prompt x `[B, T, d_model]` and the cache for decoding up to `max_len` tokens
        (of the last document only, given `segment_ids`: `hybrid_jax.nn.segments.prompt_tail`)."""
        y, k, v = self.attend(x, segment_ids=segment_ids, positions=positions)
        capacity = self.cache_capacity(max_len)
        tail = None if segment_ids is None else prompt_tail(segment_ids, positions)
        return y, KVCache(*(prompt_ring_buffer(a, capacity, lengths, tail) for a in (k, v)))

    def decode_limit(self, cache: KVCache) -> int | None:
        """A ring buffer of S slots overwrites position p - S at position p: harmless only for a window
        W <= S, which never reads that far back."""
        slots = cache.k.shape[-3]  # [..., B, S, HKV, Dh]
        return None if self.window is not None and self.window <= slots else slots

    def decode(self, x: jax.Array, cache: KVCache, position: jax.Array) -> tuple[jax.Array, KVCache]:
        """One token per row: x `[B, 1, d_model]` at positions `position` `[B]`."""
        q, k, v = self.project_qkv(x, position[:, None])
        capacity = cache.k.shape[1]
        k_cache, v_cache = kv_cache_update(cache.k, cache.v, k[:, 0], v[:, 0], position % capacity)
        k_cache, v_cache = written_in_place((k_cache, v_cache))
        o = softmax_attention_step(q[:, 0], k_cache, v_cache, length=jnp.minimum(position + 1, capacity))
        return self.o_proj(o[:, None]), KVCache(k_cache, v_cache)
