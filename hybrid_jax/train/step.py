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

MoE models (`hybrid_jax.nn.moe`) add each MoE layer's penalty (weighted load-balancing and z-losses)
to the loss that is differentiated; the reported "loss" stays the cross-entropy. Their
auxiliary-loss-free balancing biases are `TrainState.buffers`, model state outside the gradient: after
the optimiser update the step moves each bias by `bias_update_rate * sign(mean load - load)` from the
step's loads (averaged over micro-batches), and reports per MoE layer l

    moe/layer<l>/max_mean_load   max_e f_e / mean_e f_e  (f: fraction of assignments per expert)
    moe/layer<l>/aux_loss, moe/layer<l>/z_loss, moe/layer<l>/dropped   (dropped: capacity path)
    moe/penalty                  the sum of the layers' penalties added to the loss

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

from hybrid_jax.nn.moe import ExpertBias

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates applied so far
    params: Params
    opt_state: optax.OptState
    # Model state outside the gradient (the MoE balancing biases, `ExpertBias`); {} for dense models.
    buffers: Params = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed tree (a plain dict, independent of this class; "buffers" only when there
        are any, so dense models keep their checkpoint layout)."""
        tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        return {**tree, "buffers": self.buffers} if self.buffers else tree

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                   buffers=tree.get("buffers", {}))


def _merge(graphdef: nnx.GraphDef, params: Params, buffers: Params | None):
    return nnx.merge(graphdef, params, buffers) if buffers else nnx.merge(graphdef, params)


def cross_entropy_loss(graphdef: nnx.GraphDef, params: Params, batch: Mapping[str, jax.Array],
                       buffers: Params | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats) of the model `graphdef` + `params` on `batch`."""
    return model_loss(graphdef, params, buffers, batch)[1][0]


def model_loss(graphdef: nnx.GraphDef, params: Params, buffers: Params | None,
               batch: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(cross-entropy + the MoE layers' penalties, (cross-entropy, the model's MoE statistics))."""
    model = _merge(graphdef, params, buffers)
    logits, moe_stats = model.forward(batch["inputs"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"]).mean()
    return loss + _moe_penalty(model, moe_stats), (loss, moe_stats)


def _moe_penalty(model, moe_stats: dict) -> jax.Array:
    """The sum of the MoE layers' weighted balancing and z-losses (0 for a dense model)."""
    return sum((stats["penalty"] for _, stats in model.moe_layer_stats(moe_stats)), jnp.zeros(()))


def moe_metrics(model, moe_stats: dict) -> dict[str, jax.Array]:
    """The per-layer MoE metrics of the module docstring (empty for a dense model)."""
    metrics = {}
    for layer, stats in model.moe_layer_stats(moe_stats):
        load = stats["load"]
        metrics[f"moe/layer{layer}/max_mean_load"] = jnp.max(load) / jnp.mean(load)
        for key in ("aux_loss", "z_loss", "dropped"):
            metrics[f"moe/layer{layer}/{key}"] = stats[key]
    if metrics:
        metrics["moe/penalty"] = _moe_penalty(model, moe_stats)
    return metrics


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
    grad_fn = jax.grad(lambda params, buffers, batch: model_loss(graphdef, params, buffers, batch), has_aux=True)

    def loss_and_grad(params: Params, buffers: Params, batch: dict) -> tuple[tuple[jax.Array, dict], Params]:
        grads, (loss, moe_stats) = grad_fn(params, buffers, batch)
        return (loss, moe_stats), grads

    def gradients(params: Params, buffers: Params, batch: dict) -> tuple[tuple[jax.Array, dict], Params]:
        """((mean cross-entropy, mean MoE statistics), mean gradients) over the micro-batches."""
        if grad_accum_steps == 1:
            return loss_and_grad(params, buffers, batch)
        micro = _micro_batches(batch, grad_accum_steps, batch_sharding.spec, batch_sharding.mesh)

        def accumulate(carry, micro_batch):
            return jax.tree.map(jnp.add, carry, loss_and_grad(params, buffers, micro_batch)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                             jax.eval_shape(loss_and_grad, params, buffers, first))
        total, _ = jax.lax.scan(accumulate, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, moe_stats), grads = gradients(state.params, state.buffers, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        model = _merge(graphdef, state.params, state.buffers)  # the biases that routed this step
        metrics.update(moe_metrics(model, moe_stats))
        buffers = state.buffers
        if buffers:
            model.update_balance_biases(moe_stats)
            buffers = nnx.to_pure_dict(nnx.state(model, ExpertBias))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, buffers=buffers), metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, *, param_shardings: Params, batch_sharding: NamedSharding,
    buffer_shardings: Params | None = None,
) -> Callable[..., jax.Array]:
    """`eval_step(params, batch, buffers={}) -> mean cross-entropy (nats/token)`, jitted."""
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    evaluate = jax.jit(
        lambda params, buffers, batch: cross_entropy_loss(graphdef, params, batch, buffers),
        in_shardings=(param_shardings, buffer_shardings or {}, batch_shardings),
        out_shardings=NamedSharding(batch_sharding.mesh, PartitionSpec()),
    )
    return lambda params, batch, buffers=None: evaluate(params, buffers or {}, batch)


__all__ = ["TrainState", "cross_entropy_loss", "make_eval_step", "make_train_step", "model_loss", "moe_metrics"]
