"""Matmul precision of the chunked forms and the kernels' terms: the named choices, the platform
default, and matmuls at a chosen precision (`dot`, `matmul`, `matmul_t`).

"highest" is float32-exact; "high" is TF32 on GPU and three bf16 MXU passes on TPU; "default" is the
backend's fastest (one bf16 pass on TPU); "bfloat16" rounds the operands to bfloat16 and accumulates
in float32. XLA:CPU computes all but "bfloat16" in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("highest", "high", "default", "bfloat16")


def resolve_precision(precision: str | None, op: str) -> str:
    """`precision` checked, or the platform default for None: "highest" on CPU (float32 matmuls cost
    the same there), "high" on GPU / TPU (TF32 / three bf16 MXU passes: the states keep ~float32
    accuracy at half the passes of "highest")."""
    if precision is None:
        return "highest" if jax.default_backend() == "cpu" else "high"
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: unknown precision={precision!r}; valid choices are {list(PRECISIONS)} or None")
    return precision


def _operands(precision: str, *xs):
    """The operands and keyword arguments of a matmul at `precision`; "bfloat16" rounds the operands
    to bfloat16 and accumulates in float32 (one MXU pass on TPU, tensor cores on GPU)."""
    if precision == "bfloat16":
        return tuple(x.astype(jnp.bfloat16) for x in xs), {"preferred_element_type": jnp.float32}
    return xs, {"precision": precision}


def dot(spec: str, a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
    """`jnp.einsum(spec, a, b)` at a matmul precision of `PRECISIONS`."""
    (a, b), kwargs = _operands(precision, a, b)
    return jnp.einsum(spec, a, b, **kwargs)


def matmul(a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
    """`a @ b` (leading axes broadcast) at a matmul precision of `PRECISIONS`."""
    (a, b), kwargs = _operands(precision, a, b)
    return jnp.matmul(a, b, **kwargs)


def matmul_t(a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
    """`a^T @ b` over the last two axes at `precision`."""
    return matmul(jnp.swapaxes(a, -1, -2), b, precision)


def transposed_copy(*xs: jax.Array) -> jax.Array:
    """The matrices `xs` `[.., R_j, C]` transposed and side by side, `[.., C, sum R_j]`, as an explicit
    copy, for the left operand of a matmul that contracts their rows: XLA:CPU runs such a matmul on its
    slow generic path (about half the speed of its usual one here), and without the barrier XLA folds
    the transpose back into the matmul. A `[C, C]` or `[C, K]` copy per chunk is cheap beside that."""
    return jax.lax.optimization_barrier(jnp.concatenate([jnp.swapaxes(x, -1, -2) for x in xs], axis=-1))
