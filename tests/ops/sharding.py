"""Context-parallel test harness: run an op with the time axis split over the 8 fake CPU devices and
compare it with the same op on the whole row.

An op under test is wrapped as `fn(per_token, shared, initial_state, context_axis) -> (out, final)`:
`per_token` a tuple of `[B, T, ...]` arrays (split along T over the "context" mesh axis), `shared` a
tuple of arrays every shard sees whole (initial states, A, D, ...), `final` None for ops without a
state. `check_context_parallel` runs `fn` with `context_axis=None` on one device and inside
`jax.shard_map` with the time axis over `context` shards (rows over `data`), and compares outputs,
final states and the gradients of `sum(out * cot_out) + sum(final * cot_final)` with respect to every
input (integer inputs such as segment ids are split too and have none).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from hybrid_jax.ops.context import CONTEXT_AXIS
from tests.ops.mixers import assert_close


def crossing_documents(t: int, shards: int, batch: int = 2) -> jax.Array:
    """`[batch, t]` segment ids: row 0 has a document across the first shard boundary, one starting
    exactly on the second (on the first with 2 shards) and padding in its last 3 tokens; the other
    rows are one document."""
    local = t // shards
    ids = np.ones((batch, t), np.int32)
    ids[0, local - 3:] = 2
    ids[0, 2 * local if shards > 2 else local:] = 3
    ids[0, t - 3:] = 0
    return jnp.asarray(ids)


def context_mesh(context: int, data: int = 1) -> jax.sharding.Mesh:
    """A (data, context) mesh over the first data * context fake devices."""
    devices = jax.devices()[: data * context]
    return jax.make_mesh((data, context), ("data", CONTEXT_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def context_parallel(fn, mesh, per_token, shared):
    """`fn` with the time axis of `per_token` over the mesh's context axis: (out, final)."""
    def local(per_token, shared):
        return fn(per_token, shared, CONTEXT_AXIS)

    time_spec = jax.tree.map(lambda _: P(None, CONTEXT_AXIS), per_token)
    shared_spec = jax.tree.map(lambda _: P(), shared)
    return jax.shard_map(local, mesh=mesh, in_specs=(time_spec, shared_spec),
                         out_specs=(P(None, CONTEXT_AXIS), P()), axis_names={CONTEXT_AXIS})(per_token, shared)


def _cotangent_loss(run, cot_out, cot_final):
    def loss(per_token, shared):
        out, final = run(per_token, shared)
        total = jnp.sum(out.astype(jnp.float32) * cot_out)
        if final is not None:
            total = total + jnp.sum(final * cot_final)
        return total, (out, final)
    return loss


def check_context_parallel(fn, per_token, shared=(), *, context: int, data: int = 1, rtol: float = 1e-5,
                           seed: int = 0):
    """Asserts that `fn` split over `context` shards (and `data` row shards) equals `fn` on one device:
    outputs, final state and gradients with respect to `per_token` and `shared`, within `rtol`."""
    out, final = jax.eval_shape(lambda a, b: fn(a, b, None), per_token, shared)  # shapes only: no compile
    keys = jax.random.split(jax.random.key(seed), 2)
    cot_out = jax.random.normal(keys[0], out.shape, jnp.float32)
    cot_final = None if final is None else jax.random.normal(keys[1], final.shape, jnp.float32)
    mesh = context_mesh(context, data)
    whole = jax.jit(jax.value_and_grad(_cotangent_loss(lambda a, b: fn(a, b, None), cot_out, cot_final),
                                       argnums=(0, 1), has_aux=True, allow_int=True))
    split = jax.jit(jax.value_and_grad(
        _cotangent_loss(lambda a, b: context_parallel(fn, mesh, a, b), cot_out, cot_final),
        argnums=(0, 1), has_aux=True, allow_int=True))
    (_, (out_1, final_1)), grads_1 = whole(per_token, shared)
    rows = NamedSharding(mesh, P("data", CONTEXT_AXIS))
    placed = jax.tree.map(lambda x: jax.device_put(x, rows), per_token)
    with jax.set_mesh(mesh):
        (_, (out_n, final_n)), grads_n = split(placed, shared)
    assert_close(np.asarray(out_n), np.asarray(out_1), rtol=rtol, what="outputs")
    if final_1 is not None:
        assert_close(np.asarray(final_n), np.asarray(final_1), rtol=rtol, what="final state")
    for i, (g_n, g_1) in enumerate(zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1))):
        if g_1.dtype == jax.dtypes.float0:  # integer inputs (segment ids) have no gradient
            continue
        assert_close(np.asarray(g_n), np.asarray(g_1), rtol=rtol, what=f"gradient {i}")
