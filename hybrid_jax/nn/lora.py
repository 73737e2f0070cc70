r"""Low-rank adapters (LoRA, Hu et al. 2021) on projections, and the q/k/v/o projections of attention layers.

A LoRA projection adds a trainable low-rank update to a frozen kernel W `[*in, *out]`:

    y = x W (+ b) + (alpha / r) (x A) B,      A: [*in, r] (normal, std 1/sqrt(fan_in)),  B: [r, *out] = 0

so at initialisation the layer computes exactly the frozen projection. Merging folds the update into
the kernel, W' = W + (alpha / r) A B, which gives the same outputs with no adapter at all
(`merge_lora_params` does it on a parameter tree, so a trained adapter ships as a plain model).

Mixer config keys (shared by every layer built with `attention_projections`):

    qkv_bias, o_bias   biases on the q/k/v and output projections (Qwen-2 style qkv bias; HF Llama's
                       `attention_bias` sets both); default False: no bias parameters
    lora_rank          0: plain projections (the default: no adapter parameters); r > 0: LoRA of rank r
    lora_alpha         the scale numerator alpha (the update is scaled by alpha / r)
    lora_targets       which projections get an adapter, a subset of "qkvo"
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.checks import check_int, check_positive_number, fail
from hybrid_jax.nn.common import WEIGHT, Dense, logical_param

LORA_TARGETS = "qkvo"
LORA_KEYS = ("lora_a", "lora_b")


def projection_defaults() -> dict:
    """The projection keys an attention-like mixer config carries (see the module docstring)."""
    return {"qkv_bias": False, "o_bias": False, "lora_rank": 0, "lora_alpha": 16.0, "lora_targets": LORA_TARGETS}


def check_projection_config(cfg) -> None:
    """The keys of `projection_defaults` hold valid values ("<key>: <message>" errors)."""
    for key in ("qkv_bias", "o_bias"):
        if not isinstance(cfg[key], bool):
            fail(key, f"must be True or False, got {cfg[key]!r}")
    check_int(cfg, "lora_rank", minimum=0)
    check_positive_number(cfg, "lora_alpha")
    targets = cfg.lora_targets
    if not isinstance(targets, str) or not targets or set(targets) - set(LORA_TARGETS):
        fail("lora_targets", f"must be a non-empty subset of {LORA_TARGETS!r} (one letter per projection), "
                             f"got {targets!r}")


class LoRADense(Dense):
    """`Dense` plus a low-rank update (alpha / rank) (x A) B; B starts at zero (see the module docstring)."""

    def __init__(self, in_shape, out_shape, axes: Sequence[str | None], *, rank: int, alpha: float,
                 rngs: nnx.Rngs, use_bias: bool = False):
        super().__init__(in_shape, out_shape, axes, rngs=rngs, use_bias=use_bias)
        if rank < 1:
            raise ValueError(f"LoRADense: rank must be >= 1, got {rank}")
        self.rank, self.scaling = rank, float(alpha) / rank
        n_in = len(self.in_shape)
        fan_in = math.prod(self.in_shape)
        a = jax.random.normal(rngs.params(), self.in_shape + (rank,), jnp.float32) / math.sqrt(fan_in)
        self.lora_a = logical_param(a, tuple(axes[:n_in]) + ("latent",), role=WEIGHT)
        self.lora_b = logical_param(jnp.zeros((rank,) + self.out_shape, jnp.float32),
                                    ("latent",) + tuple(axes[n_in:]), role=WEIGHT)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        n_in = len(self.in_shape)
        lead = x.shape[: x.ndim - n_in]
        flat = x.reshape(lead + (-1,))
        a = self.lora_a[...].astype(x.dtype).reshape(-1, self.rank)
        b = self.lora_b[...].astype(x.dtype).reshape(self.rank, -1)
        update = ((flat @ a) @ b).reshape(lead + self.out_shape)
        return y + (self.scaling * update).astype(y.dtype)


def projection(cfg, letter: str, in_shape, out_shape, axes, *, use_bias: bool, rngs: nnx.Rngs) -> Dense:
    """Projection `letter` (one of "qkvo"): a LoRADense when cfg.lora_rank > 0 and `letter` is targeted."""
    if cfg.lora_rank > 0 and letter in cfg.lora_targets:
        return LoRADense(in_shape, out_shape, axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rngs=rngs,
                         use_bias=use_bias)
    return Dense(in_shape, out_shape, axes, rngs=rngs, use_bias=use_bias)


def attention_projections(cfg, d_model: int, heads: int, kv_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    """(q_proj, k_proj, v_proj, o_proj) of an attention-like layer, with the biases and adapters of `cfg`."""
    q = projection(cfg, "q", d_model, (heads, head_dim), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, rngs=rngs)
    k = projection(cfg, "k", d_model, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias,
                   rngs=rngs)
    v = projection(cfg, "v", d_model, (kv_heads, head_dim), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias,
                   rngs=rngs)
    o = projection(cfg, "o", (heads, head_dim), d_model, ("heads", "kv", "embed"), use_bias=cfg.o_bias, rngs=rngs)
    return q, k, v, o


def merge_lora_params(params: dict, alpha: float) -> dict:
    """A copy of the parameter tree `params` (`nnx.to_pure_dict`) with every adapter folded into its
    kernel, W + (alpha / r) A B, and the `lora_a` / `lora_b` entries removed. Works on stacked
    (scanned) parameters: leading axes shared by kernel, A and B are batch axes."""
    if not isinstance(params, dict):
        return params
    merged = {key: merge_lora_params(value, alpha) for key, value in params.items() if key not in LORA_KEYS}
    if "lora_a" in params:
        kernel, a, b = (np.asarray(params[key], np.float32) for key in ("kernel", "lora_a", "lora_b"))
        rank = a.shape[-1]
        lead = a.ndim - 1 + b.ndim - 1 - kernel.ndim  # stacked axes in front of every one of the three
        a2 = a.reshape(a.shape[:lead] + (-1, rank))
        b2 = b.reshape(b.shape[:lead] + (rank, -1))
        merged["kernel"] = kernel + (alpha / rank) * np.matmul(a2, b2).reshape(kernel.shape)
    return merged
