r"""Normalisation layers: RMSNorm, the gated output norm of the linear mixers, and L2 normalisation.

    RMSNorm(x)          = x / sqrt(mean(x^2) + eps) * w
    GatedRMSNorm(o, z)  = RMSNorm(o) * act(z)        (act = SiLU for GDN / Mamba-2, sigmoid for KDA)
    l2_normalize(x)     = x / sqrt(sum(x^2) + eps)   (q, k of the delta-rule family)

Statistics are computed in float32 and the result is returned in the input dtype. The weight `w`
starts at one and spans the last axis (for a per-head norm, `dim` is the head dim and the weight is
shared by all heads, as in flash-linear-attention's fused gated norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.nn.common import NO_DECAY, activation, logical_param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with a learned scale (initialised to one)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every layer has the same constructor shape
        self.dim, self.eps = dim, eps
        self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("norm",), role=NO_DECAY)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: last dim of x must be {self.dim}, got shape {tuple(x.shape)}")
        return (rms_normalize(x, self.eps) * self.scale[...]).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """RMSNorm(o) * act(gate): the output norm of Gated DeltaNet, KDA and Mamba-2.

    `o` and `gate` have the same shape with last dim `dim` (usually `[B, T, H, head_dim]`).
    """

    def __init__(
        self, dim: int, *, activation_name: str = "silu", eps: float = 1e-6, rngs: nnx.Rngs | None = None
    ):
        del rngs
        self.dim, self.eps = dim, eps
        activation(activation_name)  # fail at construction on an unknown name
        self.activation_name = activation_name
        self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("norm",), role=NO_DECAY)

    def __call__(self, o: jax.Array, gate: jax.Array) -> jax.Array:
        if o.shape[-1] != self.dim or gate.shape != o.shape:
            raise ValueError(
                f"GatedRMSNorm: o and gate must share one shape with last dim {self.dim}, "
                f"got o {tuple(o.shape)} and gate {tuple(gate.shape)}"
            )
        gated = (
            rms_normalize(o, self.eps)
            * self.scale[...]
            * activation(self.activation_name)(gate.astype(jnp.float32))
        )
        return gated.astype(o.dtype)
