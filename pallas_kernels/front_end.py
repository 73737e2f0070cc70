"""The one argument front end of every public mixer op, every `*_step` and the kernel entry.

Every op validates its inputs here, before anything is traced into a scan, so that a wrong shape
fails with one message that names the op, the argument and the shape it should have. Then it casts
to float32, scales q and expands grouped q/k heads to the value heads (`prepare_qkv`).

It lives in pallas_kernels, not in hybrid_jax.ops, because both use it and hybrid_jax.ops imports
the kernels, never the other way round. Conventions (shapes, grouped heads, the output dtype) are in
the repository's `docs/conventions.md`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(x.shape)}")


def check_shape(name: str, x: jax.Array | None, expected: Sequence[int], layout: str) -> None:
    """Raises a ValueError naming `name`, the layout and the expected shape (None passes)."""
    if x is None:
        return
    expected = tuple(int(e) for e in expected)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(x.shape)}")


def check_floating(name: str, x: jax.Array | None) -> None:
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_time(op: str, length: int, **inputs: jax.Array) -> None:
    """T >= 1: an empty sequence would otherwise end in a division by a zero chunk length."""
    if length < 1:
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in inputs.items())
        raise ValueError(f"{op}: needs at least one time step (T >= 1), got T={length} from {shapes}")


class Dims(NamedTuple):
    """Sizes of a q, k `[B, T, H, K]`, v `[B, T, HV, V]` call."""

    batch: int
    time: int
    heads: int
    key_dim: int
    value_heads: int
    value_dim: int


def check_qkv(op: str, q: jax.Array, k: jax.Array, v: jax.Array) -> Dims:
    """Checks q, k `[B, T, H, K]` and v `[B, T, HV, V]` (floating, HV % H == 0, T >= 1)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(f"{op}: {name}", x, 4, "[B, T, H, D]")
        check_floating(f"{op}: {name}", x)
    b, t, h, dk = q.shape
    check_shape(f"{op}: k", k, q.shape, "[B, T, H, K] (same as q)")
    hv, dv = v.shape[2], v.shape[3]
    if v.shape[:2] != (b, t):
        raise ValueError(f"{op}: v must have shape [B, T, HV, V] with B={b}, T={t}, got {tuple(v.shape)}")
    if hv % h != 0:
        raise ValueError(f"{op}: v heads HV={hv} must be a multiple of q/k heads H={h} (grouped heads)")
    check_time(op, t, q=q, k=k, v=v)
    return Dims(b, t, h, dk, hv, dv)


def check_gate(op: str, g: jax.Array, dims: Dims, *, per_channel: bool | None) -> jax.Array:
    """Validates g (`[B,T,HV]` scalar or `[B,T,HV,K]` per channel; `per_channel=None` allows both) and
    returns it as `[B, T, HV, K or 1]`."""
    scalar_shape = (dims.batch, dims.time, dims.value_heads)
    channel_shape = scalar_shape + (dims.key_dim,)
    allowed = {None: (scalar_shape, channel_shape), False: (scalar_shape,), True: (channel_shape,)}
    allowed = allowed[per_channel]
    if tuple(g.shape) not in allowed:
        names = {scalar_shape: "[B, T, HV]", channel_shape: "[B, T, HV, K]"}
        want = " or ".join(f"{names[s]} = {s}" for s in allowed)
        raise ValueError(f"{op}: g must have shape {want}, got {tuple(g.shape)}")
    return g[..., None] if g.ndim == 3 else g


def check_isolated(op: str, isolated, shape: Sequence[int], *, name: str = "isolated",
                   layout: str = "[B, T]") -> jax.Array | None:
    """Checks a candidate-isolation mask: a bool array of shape `layout` = `shape` (None passes).

    Isolated tokens read the state but never write into what other tokens read (the repository's
    docs/conventions.md, "Isolated tokens")."""
    if isolated is None:
        return None
    isolated = jnp.asarray(isolated)
    shape = tuple(int(n) for n in shape)
    if isolated.dtype != jnp.bool_:
        raise ValueError(f"{op}: {name} must be a bool array of shape {layout} = {shape}, "
                         f"got dtype {isolated.dtype}")
    check_shape(f"{op}: {name}", isolated, shape, f"{layout} (bool)")
    return isolated


def to_f32(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else x.astype(jnp.float32)


def default_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def repeat_heads(x: jax.Array, heads: int, axis: int = 2) -> jax.Array:
    """Expands grouped heads to `heads` (each of the G heads shared by heads // G consecutive heads)."""
    groups = x.shape[axis]
    if groups == heads:
        return x
    return jnp.repeat(x, heads // groups, axis=axis)


def prepare_qkv(op: str, q, k, v, *, scale: float | None, step: bool = False):
    """The front end of the linear-attention-like ops: checks q, k, v, casts them to float32, scales q
    (default K ** -0.5) and expands q/k to the value heads. `step=True` takes one token, `[B, H, D]`.
    Returns (q, k, v, dims), arrays `[B, T, HV, .]` (`[B, HV, .]` for a step)."""
    if step:
        q, k, v = q[:, None], k[:, None], v[:, None]
    dims = check_qkv(op, q, k, v)
    q = repeat_heads(to_f32(q) * default_scale(scale, dims.key_dim), dims.value_heads)
    k = repeat_heads(to_f32(k), dims.value_heads)
    v = to_f32(v)
    if step:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    return q, k, v, dims
