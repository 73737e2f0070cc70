r"""Train and eval steps: `jax.jit` with explicit in/out shardings over a split NNX model (pjit).

    loss(theta; x, y) = -1/(B T) sum_{b,t} log softmax(f_theta(x)_{b,t})[y_{b,t}]       (nats/token)

    with A = train.grad_accum_steps micro-batches of B/A rows each,
    g = 1/A sum_a grad loss(theta; x_a, y_a)    (micro-batch a takes rows a, A + a, 2A + a, ...)

The model is split once into a static `graphdef` and a parameter tree (`nnx.split`); the steps are
pure functions of `(TrainState, batch)` jitted with `jax.jit`, which is several times faster per
step than graph-mode `nnx.jit` on small models. Parameters are a plain nested dict
(`nnx.to_pure_dict`) so the checkpoint layout does not depend on flax's Variable classes.

Parameters and optimiser moments stay float32; `model.dtype = "bfloat16"` makes the model compute
in bfloat16 (activations and matmul inputs), with logits and the loss in float32. The train state is
donated: its buffers are reused for the next state, so peak memory holds one copy.

Micro-batches are strided rows, not contiguous blocks: the rows of a batch are split over the
devices of the `batch` mesh axes in contiguous blocks, so a strided micro-batch keeps every device
busy and needs no data movement.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates applied so far
    params: Params
    opt_state: optax.OptState

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed tree (a plain dict, independent of this class)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])


def cross_entropy_loss(graphdef: nnx.GraphDef, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy (nats) of the model `graphdef` + `params` on `batch`."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def _micro_batches(batch: Mapping[str, jax.Array], num: int, batch_spec: PartitionSpec, mesh) -> dict:
    """[B, ...] -> [num, B / num, ...], micro-batch a holding rows a, num + a, 2 num + a, ..."""
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, *batch_spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return {key: split(value) for key, value in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (new_state, metrics)`, jitted; `state` is donated.

    metrics: "loss" (mean over the batch), "grad_norm" (global L2 norm before clipping) and, given
    the optimiser's `schedule`, "learning_rate" (of this update).
    """
    loss_and_grad = jax.value_and_grad(lambda params, batch: cross_entropy_loss(graphdef, params, batch))

    def gradients(params: Params, batch: dict) -> tuple[jax.Array, Params]:
        if grad_accum_steps == 1:
            return loss_and_grad(params, batch)
        micro = _micro_batches(batch, grad_accum_steps, batch_sharding.spec, batch_sharding.mesh)

        def accumulate(carry, micro_batch):
            loss_sum, grad_sum = carry
            loss, grads = loss_and_grad(params, micro_batch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, zeros, micro)
        return loss_sum / grad_accum_steps, jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads = gradients(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, *, param_shardings: Params, batch_sharding: NamedSharding
) -> Callable[[Params, dict], jax.Array]:
    """`eval_step(params, batch) -> mean loss (nats/token)`, jitted."""
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        lambda params, batch: cross_entropy_loss(graphdef, params, batch),
        in_shardings=(param_shardings, batch_shardings),
        out_shardings=NamedSharding(batch_sharding.mesh, PartitionSpec()),
    )


__all__ = ["TrainState", "cross_entropy_loss", "make_eval_step", "make_train_step"]
