r"""Rotary position embedding (RoPE), rotate-half layout, with a partial rotary dimension.

For head vector x of size D, rotary dim R (even, R <= D), position p and theta:

    inv_freq_i = theta^(-2i / R),          i = 0 .. R/2 - 1
    a = x[:R/2], b = x[R/2:R]
    rope(x, p) = concat(a cos(p f) - b sin(p f),  b cos(p f) + a sin(p f),  x[R:])

i.e. dims (i, i + R/2) form the rotated pairs (the GPT-NeoX / Llama layout); the last D - R dims
pass through unchanged (partial rotary, as in GPT-NeoX and Phi). Because each pair is rotated by an
angle linear in p, scores depend only on relative position: rope(q, m) . rope(k, n) is a function of
q, k and m - n. Angles are computed in float32 (positions can be large), the result is cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    """The even rotary dimension int(head_dim * fraction) rounded down to even."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rope_fraction must be in [0, 1], got {fraction}")
    return (int(head_dim * fraction) // 2) * 2


def rope_angles(positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Angles p * inv_freq `[..., R/2]` in float32 for integer or float positions `[...]`."""
    inv_freq = theta ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(
    x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, rotary_dim: int | None = None
) -> jax.Array:
    """Rotates x `[B, T, H, D]` by `positions` (`[B, T]` or `[T]`); only the first `rotary_dim` dims."""
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must have shape [B, T, H, D], got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else int(rotary_dim)
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"apply_rope: rotary_dim must be even and in [0, {head_dim}], got {rotary_dim}")
    if positions.shape not in ((x.shape[1],), tuple(x.shape[:2])):
        raise ValueError(
            f"apply_rope: positions must have shape [T] or [B, T] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}"
        )
    if rotary_dim == 0:
        return x
    angles = rope_angles(positions, rotary_dim, theta)  # [T, R/2] or [B, T, R/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    half = rotary_dim // 2
    x32 = x.astype(jnp.float32)
    a, b, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
