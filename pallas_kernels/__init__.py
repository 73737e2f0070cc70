"""Pallas kernels for the chunked gated recurrences (GPU: Triton, TPU: Mosaic), each behind a
jax.custom_vjp, with interpret mode on CPU. Imported by hybrid_jax.ops, never the other way round.

    gated_recurrence(q, k, v, g, beta, state, *, chunk_size, backend=None, interpret=None)
    supports(...) -> (bool, reason)

Importing the package loads no Triton or Mosaic module: `gated_recurrence`, `supports` and
`BACKENDS` come from `pallas_kernels.api`, which loads both backends on first access. What
hybrid_jax.ops needs on every path (`chunk_math`, `front_end`) is plain JAX.
"""
import importlib

from pallas_kernels.delta import delta_reference
from pallas_kernels.gla import gla_reference

__all__ = ["BACKENDS", "gated_recurrence", "supports", "delta_reference", "gla_reference"]
_FROM_API = ("BACKENDS", "gated_recurrence", "supports")


def __getattr__(name):
    if name in _FROM_API:
        return getattr(importlib.import_module("pallas_kernels.api"), name)
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
