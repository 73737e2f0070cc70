"""The device mesh and the logical-axis rules that place parameters and batches on it.

    mesh     = jax.make_mesh(mesh.shape, mesh.axes)            e.g. (-1, 1, 1) over (data, fsdp, tensor)
    rules    = {logical axis -> mesh axis | tuple of mesh axes | None}        (config `mesh.axis_rules`)
    spec     = PartitionSpec(rules[a_0], rules[a_1], ...)    for a parameter with logical axes (a_0, ...)
    batch    = PartitionSpec(rules["batch"], rules["length"]) rows of [B, T] over (data, fsdp, expert),
                                                              time over context

Every parameter carries one logical name per dimension (`hybrid_jax.nn.logical_axes`); the rules
turn those names into a `NamedSharding`. A dimension stays replicated when its name has no rule
(logged once), when its mesh axes are already used by an earlier dimension of the same array (a
mesh axis may split an array once), or when the dimension does not divide evenly (logged: sharding
it would need padding, which parameters never want). Mesh axes are `AxisType.Auto`, so XLA's
partitioner propagates the shardings through the step; jax 0.12's `make_mesh` would default to
Explicit axes.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hybrid_jax.config import resolve_mesh_shape, rule_targets, validate_mesh

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `mesh_config` (`shape`, `axes`) over `devices` (default: all devices).

    `mesh.shape` is resolved by `hybrid_jax.config.resolve_mesh_shape` (kept in the config module so
    that `validate(config, device_count=...)` can check it before anything is built)."""
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(mesh_config.axes)
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def axis_rules(mesh_config) -> dict[str, MeshAxes]:
    """`mesh.axis_rules` as a dict, after `hybrid_jax.config.validate_mesh`."""
    validate_mesh(mesh_config)
    return {name: rule_targets(target) or None for name, target in mesh_config.axis_rules}


_warned: set[tuple] = set()


def _warn_once(key: tuple, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def logical_to_mesh_spec(
    logical: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """The mesh `PartitionSpec` of an array of `shape` whose dims have the `logical` axis names."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not name each dim of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            _warn_once(("rule", name), "logical axis %r has no rule in mesh.axis_rules; replicated", name)
        targets = tuple(a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in targets)
        if targets and size % ways:
            _warn_once(
                ("divide", name, size, targets),
                "logical axis %r (size %d) does not divide over mesh axes %s (%d ways); replicated",
                name, size, targets, ways,
            )
            targets = ()
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*spec)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def tree_shardings(logical_specs, abstract_tree, rules: Rules, mesh: Mesh):
    """`NamedSharding`s for `abstract_tree` (arrays or ShapeDtypeStructs) from its logical specs."""
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), leaf.shape, rules, mesh)),
        logical_specs,
        abstract_tree,
        is_leaf=_is_spec,
    )


def batch_spec(rules: Rules) -> PartitionSpec:
    """Rows over the mesh axes of the `batch` rule; the time axis over those of the `length` rule
    (the "context" axis: context parallelism, `hybrid_jax.nn.context`), replicated without one."""
    return PartitionSpec(rules.get("batch"), rules.get("length"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays (rows of process p follow those of p - 1)."""
    out = {}
    for key, local in local_batch.items():
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


__all__ = [
    "axis_rules",
    "batch_spec",
    "global_batch",
    "logical_to_mesh_spec",
    "make_mesh",
    "replicated",
    "resolve_mesh_shape",
    "tree_shardings",
]
