r"""Learnable feature maps of the linear-attention layers (shared by `linear_attention` and `lolcats`).

Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine"), per head h, input dim D, feature dim F:

    phi(x) = [softmax(x A_h + b_h), softmax(-(x A_h + b_h))]  in R^{2F},   A_h: [D, F], b_h: [F]

A_h starts at the identity (the first min(D, F) dims) and b_h at zero, so training starts from the
parameter-free two-sided softmax; the softmax over the feature axis keeps phi(q) . phi(k) positive
and spiky like exp(q . k), which is what lets it imitate softmax attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.nn.common import NO_DECAY, WEIGHT, logical_param


class HedgehogFeatureMap(nnx.Module):
    """[softmax(x A_h + b_h), softmax(-(x A_h + b_h))] per head: `[..., H, D]` -> `[..., H, 2F]`."""

    def __init__(self, heads: int, dim: int, feature_dim: int | None = None, *, rngs: nnx.Rngs | None = None):
        del rngs  # identity init: training starts from the parameter-free two-sided softmax
        feature_dim = dim if feature_dim is None else feature_dim
        identity = jnp.broadcast_to(jnp.eye(dim, feature_dim, dtype=jnp.float32), (heads, dim, feature_dim))
        self.weight = logical_param(identity, ("heads", "kv", None), role=WEIGHT)
        self.bias = logical_param(jnp.zeros((heads, feature_dim), jnp.float32), ("heads", "kv"), role=NO_DECAY)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The feature map in x's dtype (computed in float32)."""
        h = jnp.einsum("...hd,hde->...he", x.astype(jnp.float32), self.weight[...]) + self.bias[...]
        return jnp.concatenate([jax.nn.softmax(h, axis=-1), jax.nn.softmax(-h, axis=-1)], axis=-1).astype(x.dtype)
