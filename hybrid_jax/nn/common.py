"""Building blocks every layer uses: parameters with logical axis names, Dense, Embed, activations.

Logical axes. Every parameter is created by `logical_param(value, axes, role=...)`, which stores one
name per array dimension (`"embed"`, `"vocab"`, `"heads"`, `"kv_heads"`, `"kv"`, `"mlp"`, `"latent"`,
`"expert"`, `"norm"`, `"conv"`; the layer scan puts `"layers"` in front of every stacked parameter).
The training loop maps these names to mesh axes with rules; `logical_axes(model)` returns them as a
tree of `PartitionSpec`s with the structure of `nnx.state(model, nnx.Param)`.

Roles. Every parameter also declares what it is, where it is created, so the optimiser never guesses
from shapes (`param_roles(model)` collects them like `logical_axes`):

    "weight"     projection, convolution and feature-map matrices: weight decay applies
    "embedding"  the token embedding (and so a tied output): decays iff train.decay_embeddings
    "no_decay"   norm scales, biases of any rank, A_log, dt_bias, D skips, level weights: never decays

Published recipes (Mamba, flash-linear-attention) exclude the last group: decay would pull A_log
towards zero (every rate A = -exp(A_log) towards -1, whatever the data asks for), dt_bias towards
zero (every step size towards softplus(0)), and norm scales and D skips towards zero.

The flax metadata key differs by version: recent flax reads `out_sharding` (and, by default, shards
eagerly at creation, which needs a mesh), flax 0.11 and early 0.12 read `sharding_names`.
`logical_param` writes whichever the installed flax reads back and turns eager sharding off:
parameters are created unsharded (or abstractly, under `nnx.eval_shape`) and placed by the training
loop (jit with out_shardings), so building a model never depends on an ambient mesh.

Dtypes. Parameters are stored in float32; a layer computes in the dtype of its input, casting each
kernel to it at use (`Dense`), so `x.astype(jnp.bfloat16)` runs the model in bfloat16 with float32
master weights. Norms and softmax statistics run in float32 regardless.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# nnx.List is required for lists of modules on flax >= 0.12 and absent on 0.11 (where lists work).
ModuleList = getattr(nnx, "List", list)


@functools.cache
def _sharding_key() -> str:
    """The metadata key the installed flax reads logical axes from (asked, not inferred from versions)."""
    spec = nnx.get_partition_spec(nnx.Param(np.zeros(1), out_sharding=("probe",), eager_sharding=False))
    spec = spec.get_value() if hasattr(spec, "get_value") else spec.value  # flax 0.12 / 0.11
    return "out_sharding" if tuple(spec) == ("probe",) else "sharding_names"


WEIGHT, EMBEDDING, NO_DECAY = "weight", "embedding", "no_decay"
ROLES = (WEIGHT, EMBEDDING, NO_DECAY)


def logical_param(value: jax.Array, axes: Sequence[str | None], *, role: str) -> nnx.Param:
    """An `nnx.Param` holding `value` annotated with one logical axis name per dimension and its
    role (one of `ROLES`, see the module docstring; required, so no parameter's role is guessed)."""
    if role not in ROLES:
        raise ValueError(f"logical_param: role {role!r} is not valid; valid values are {list(ROLES)}")
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(
            f"logical_param: axes {axes} must name each of the {value.ndim} dims of shape {value.shape}"
        )
    # eager_sharding=False: no mesh needed at creation (flax 0.12 would shard eagerly; 0.11 ignores it).
    return nnx.Param(value, role=role, **{_sharding_key(): axes, "eager_sharding": False})


def _param_state(module_or_state) -> nnx.State:
    if isinstance(module_or_state, nnx.State):
        return module_or_state
    return nnx.state(module_or_state, nnx.Param)


def logical_axes(module_or_state) -> nnx.State:
    """The logical `PartitionSpec` of every parameter, as a tree shaped like `nnx.state(model, nnx.Param)`."""
    state = _param_state(module_or_state)
    return nnx.get_partition_spec(state)


def param_roles(module_or_state) -> dict:
    """The role of every parameter, as a nested dict shaped like `nnx.to_pure_dict` of the parameters."""
    state = _param_state(module_or_state)
    flat = {path: variable.get_metadata()["role"] for path, variable in nnx.to_flat_state(state)}
    return nnx.traversals.unflatten_mapping(flat)


def count_params(module_or_state) -> int:
    """Total number of parameter elements (works on abstract models from `nnx.eval_shape`)."""
    state = _param_state(module_or_state)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def _as_shape(dims: int | Sequence[int]) -> tuple[int, ...]:
    return (int(dims),) if isinstance(dims, int) else tuple(int(d) for d in dims)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name`; a ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Dense(nnx.Module):
    """y = x W (+ b) contracting the trailing `in_shape` dims of x into `out_shape` dims.

    `axes` names the kernel dims `(*in_axes, *out_axes)`. Multi-dimensional shapes keep per-head
    structure in the kernel (e.g. `[d_model, heads, head_dim]`) so that heads can be sharded.
    The kernel is lecun-normal over the fan-in (std 1/sqrt(prod(in_shape))) times `init_scale`;
    its role is "weight" (decays), the bias's "no_decay".
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        init_scale: float = 1.0,
    ):
        self.in_shape, self.out_shape = _as_shape(in_shape), _as_shape(out_shape)
        axes = tuple(axes)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"Dense: axes {axes} must name the kernel dims {self.in_shape + self.out_shape}")
        fan_in = math.prod(self.in_shape)
        std = init_scale / math.sqrt(fan_in)
        kernel = std * jax.random.normal(rngs.params(), self.in_shape + self.out_shape, jnp.float32)
        self.kernel = logical_param(kernel, axes, role=WEIGHT)
        self.bias = (
            logical_param(jnp.zeros(self.out_shape, jnp.float32), axes[len(self.in_shape) :], role=NO_DECAY)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if tuple(x.shape[x.ndim - n_in :]) != self.in_shape:
            raise ValueError(
                f"Dense: input trailing dims must be {self.in_shape}, got shape {tuple(x.shape)}"
            )
        kernel = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(
            x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table `[vocab, d_model]`; `attend` gives tied-embedding logits x E^T."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
        self.vocab_size, self.d_model = vocab_size, d_model
        # std 1/sqrt(d): tied logits of a unit-RMS hidden state start with unit variance.
        table = jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32) / math.sqrt(d_model)
        self.embedding = logical_param(table, ("vocab", "embed"), role=EMBEDDING)

    def __call__(self, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(
            "btd,vd->btv", x, self.embedding[...].astype(x.dtype), preferred_element_type=jnp.float32
        )
