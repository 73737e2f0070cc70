"""Shared plumbing of the mixer primitives: the impl enum and its dispatch checks, and the one
argument front end (`pallas_kernels.front_end`: shape and dtype checks, T >= 1, float32 casts,
scaling q, grouped heads), re-exported here for the ops.

The front end lives with the kernels because the Pallas entry uses it too and hybrid_jax.ops imports
the kernels, never the reverse; neither module loads a Triton or Mosaic module.
"""
from __future__ import annotations

import enum
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_math import MIN_LOWER_BOUND, PRECISIONS, pad_time
from pallas_kernels.front_end import (
    Dims,
    check_floating,
    check_gate,
    check_isolated,
    check_qkv,
    check_rank,
    check_shape,
    check_time,
    default_scale,
    prepare_qkv,
    repeat_heads,
    to_f32,
)

__all__ = [
    "MIN_LOWER_BOUND", "PRECISIONS", "Dims", "Impl",
    "check_chunk_size", "check_floating", "check_gate", "check_grouped_heads", "check_isolated",
    "check_qkv", "check_rank", "check_same_dtype", "check_segment_ids", "check_shape", "check_time",
    "default_scale", "pad_time", "prepare_qkv", "repeat_heads", "resolve_impl", "to_f32",
]


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


def check_chunk_size(chunk_size: int, op: str, lo: int = 1, hi: int = 1024, name: str = "chunk_size") -> None:
    if not isinstance(chunk_size, int) or not lo <= chunk_size <= hi:
        raise ValueError(f"{op}: {name} must be an int in [{lo}, {hi}], got {chunk_size!r}")


def check_grouped_heads(heads: int, kv_heads: int, op: str) -> None:
    """Softmax-style grouped heads (GQA): q's H heads a multiple of k/v's HKV heads."""
    if heads % kv_heads != 0:
        raise ValueError(
            f"{op}: q heads H={heads} must be a multiple of k/v heads HKV={kv_heads} (grouped-query heads)"
        )


def check_same_dtype(op: str, **arrays: jax.Array) -> None:
    dtypes = {name: x.dtype for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"{op}: {', '.join(dtypes)} must share one dtype, got {listed}")


def check_segment_ids(op: str, segment_ids, shape: Sequence[int], *, name: str = "segment_ids",
                      layout: str = "[B, T]") -> jax.Array | None:
    """Checks packed-document ids: an integer array of shape `layout` = `shape` (None passes); returns
    them as int32. Their meaning (1, 2, ... per document, 0 = padding) is in docs/conventions.md,
    "Packed documents"; the derived masks are in `hybrid_jax.ops.segments`."""
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    shape = tuple(int(n) for n in shape)
    meaning = "1, 2, ... per document, 0 = padding"
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{op}: {name} must be an integer array of shape {layout} = {shape} ({meaning}), "
                         f"got dtype {segment_ids.dtype}")
    check_shape(f"{op}: {name}", segment_ids, shape, f"{layout} (int32, {meaning})")
    return segment_ids.astype(jnp.int32)
