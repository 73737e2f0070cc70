"""Shared plumbing of the mixer primitives: the impl enum, argument checks, grouped heads, padding.

Every op validates its inputs here so that a wrong shape fails with one message that names the
argument and the shape it should have, before anything is traced into a scan.
"""
from __future__ import annotations

import enum
from typing import Sequence

import jax
import jax.numpy as jnp


class Impl(str, enum.Enum):
    """Algorithms a mixer primitive can run with (all return the same result)."""

    REFERENCE = "reference"  # lax.scan of the exact recurrence in float32: the ground truth
    SCAN = "scan"  # jax.lax.associative_scan
    CHUNK = "chunk"  # chunked matmul form (the fast path on every backend)
    PALLAS = "pallas"  # Pallas kernel (GPU / TPU)
    XLA = "xla"  # jax.nn.dot_product_attention (softmax attention only)
    AUTO = "auto"  # the Pallas kernel where it supports the platform and shapes, else CHUNK


def resolve_impl(impl: str | Impl, op: str, supported: Sequence[Impl]) -> Impl:
    """Turns `impl` into an `Impl`, or raises naming the op and the valid choices."""
    names = [i.value for i in supported]
    try:
        choice = Impl(impl)
    except ValueError:
        choice = None
    if choice not in supported:
        raise ValueError(f"{op}: unknown impl={impl!r}; valid choices are {names}")
    return choice


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(x.shape)}")


def check_shape(name: str, x: jax.Array | None, expected: Sequence[int], layout: str) -> None:
    """Raises a ValueError naming `name`, the layout and the expected shape."""
    if x is None:
        return
    expected = tuple(int(e) for e in expected)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(x.shape)}")


def check_floating(name: str, x: jax.Array | None) -> None:
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, op: str) -> tuple[int, int, int, int, int, int]:
    """Checks q, k `[B, T, H, K]` and v `[B, T, HV, V]` with HV % H == 0; returns B, T, H, K, HV, V."""
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
    return b, t, h, dk, hv, dv


def repeat_heads(x: jax.Array, heads: int, axis: int = 2) -> jax.Array:
    """Expands grouped q/k heads to `heads` value heads (each group shared by heads // H heads)."""
    groups = x.shape[axis]
    if groups == heads:
        return x
    return jnp.repeat(x, heads // groups, axis=axis)


def default_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def pad_time(x: jax.Array, multiple: int, axis: int = 1, value: float = 0.0) -> jax.Array:
    """Pads `axis` up to a multiple of `multiple` (padded steps must be identity steps for the op)."""
    t = x.shape[axis]
    extra = (-t) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_chunk_size(chunk_size: int, op: str, lo: int = 1, hi: int = 1024, name: str = "chunk_size") -> None:
    if not isinstance(chunk_size, int) or not lo <= chunk_size <= hi:
        raise ValueError(f"{op}: {name} must be an int in [{lo}, {hi}], got {chunk_size!r}")
