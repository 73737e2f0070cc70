"""Context parallelism in the layers: which mesh axis, if any, splits the time axis right now.

`HybridLM` runs each mixer inside `jax.shard_map` over the "context" mesh axis when the mesh in
scope (`jax.set_mesh`) has one of size > 1 (`sharded_mixer`); inside, the layers see their shard of
the sequence and hand `context_axis` to their ops and short convolutions, which exchange states,
halos or keys through collectives (`hybrid_jax.ops.context`). Layers read the axis from
`context_axis()` rather than from an argument, so the `Mixer` call signature stays the one every
layer already has, the way flax's logical axis rules are read from a context:

    with splitting_time("context"):      # set by sharded_mixer inside the shard_map
        y = mixer(x_shard, segment_ids=ids_shard, positions=pos_shard)
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybrid_jax.nn.segments import resolve_positions
from hybrid_jax.ops.context import CONTEXT_AXIS

_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("context_axis", default=None)


@contextlib.contextmanager
def splitting_time(axis: str | None):
    """Within this block, layers run on a shard of the time axis split over mesh axis `axis`."""
    token = _AXIS.set(axis)
    try:
        yield
    finally:
        _AXIS.reset(token)


def context_axis() -> str | None:
    """The mesh axis the time axis is split over (inside `sharded_mixer`), or None."""
    return _AXIS.get()


def context_option() -> dict:
    """`{"context_axis": axis}` for an op call while the time axis is split, else `{}` (the op then
    runs exactly as it did before context parallelism existed)."""
    axis = _AXIS.get()
    return {} if axis is None else {"context_axis": axis}


def mesh_context_size() -> int:
    """The size of the "context" axis of the mesh in scope (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[CONTEXT_AXIS]


def sharded_mixer(mixer, x: jax.Array, documents: dict | None) -> jax.Array:
    """`mixer(x, **documents)`, with the time axis split over the mesh's context axis when it has one
    of size > 1 (x `[B, T, D]`, documents' arrays `[B, T]`; T must divide evenly). Split, the mixer
    always gets `positions`, the ones it would default to over the whole row (within the documents,
    else 0 .. T - 1): a shard's own defaults would restart at its first token."""
    shards = mesh_context_size()
    if shards == 1 or context_axis() is not None:
        return mixer(x, **(documents or {}))
    if x.shape[1] % shards:
        raise ValueError(f"context parallelism: the sequence length {x.shape[1]} does not divide over "
                         f"the {shards} shards of mesh axis {CONTEXT_AXIS!r}; use a length that is a "
                         f"multiple of {shards} or a smaller context axis")
    documents = {name: value for name, value in (documents or {}).items() if value is not None}
    if "positions" not in documents:  # what the layer would take unsplit, over the whole row
        documents["positions"] = resolve_positions(x.shape[1], documents.get("segment_ids"), None)
        documents["positions"] = jnp.broadcast_to(documents["positions"], x.shape[:2]).astype(jnp.int32)
    time_spec = P(None, CONTEXT_AXIS)

    def local(x, documents):
        with splitting_time(CONTEXT_AXIS):
            return mixer(x, **documents)

    specs = (time_spec, {name: time_spec for name in documents})
    return jax.shard_map(local, in_specs=specs, out_specs=time_spec, axis_names={CONTEXT_AXIS})(x, documents)


__all__ = ["context_axis", "context_option", "mesh_context_size", "sharded_mixer", "splitting_time"]
