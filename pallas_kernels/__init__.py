"""Pallas kernels for the chunked gated recurrences (GPU: Triton, TPU: Mosaic), each behind a
jax.custom_vjp, with interpret mode on CPU. Imported by hybrid_jax.ops, never the other way round.

    gated_recurrence(q, k, v, g, beta, state, *, chunk_size, backend=None, interpret=None)
    supports(...) -> (bool, reason)
"""
from pallas_kernels.api import BACKENDS, gated_recurrence, supports
from pallas_kernels.delta import delta_reference
from pallas_kernels.gla import gla_reference

__all__ = ["BACKENDS", "gated_recurrence", "supports", "delta_reference", "gla_reference"]
