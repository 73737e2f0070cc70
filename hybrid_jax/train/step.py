r"""Train and eval steps: `jax.jit` with explicit in/out shardings over a split NNX model (pjit).

The masked next-token loss (nats per counted token):

    nll_{b,t} = -log softmax(f_theta(x)_{b,t})[y_{b,t}]
    loss(theta; x, y, m) = sum_{b,t} m_{b,t} nll_{b,t} / max(sum_{b,t} m_{b,t}, 1)

    with A = train.grad_accum_steps micro-batches of B/A rows each (micro-batch a takes rows a, A + a,
    2A + a, ...), each micro-batch's sum is divided by the mask total of the whole batch, so
    g = sum_a grad(sum_{b,t in a} m nll) / max(sum_{b,t} m, 1) is the gradient of the loss above.

`m` is the batch's optional "loss_mask" (float32 [B, T]; absent = all ones, the plain mean over
B T tokens). It says which positions are scored: the answer positions of the synthetic recall tasks
(`hybrid_jax.data.tasks`), and, for packed documents with padding, 0 on the padding. Accuracy
(argmax == target) is counted over the same positions. Packed batches (`data.packing = "documents"`,
`hybrid_jax.data.packing`) also carry "segment_ids" and "positions" (int32 [B, T]), which the steps
hand to the model (`model_inputs`). Every key of a batch is sharded alike (rows over the `batch`
mesh axes), so masks, segment ids and positions travel with their inputs and targets.

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


LOSS_MASK = "loss_mask"  # the optional batch key of the masked loss (module docstring)
DOCUMENT_KEYS = ("segment_ids", "positions")  # optional batch keys of packed documents, passed to the model


def model_inputs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(tokens, the packed-document keywords of `HybridLM.forward` the batch carries)."""
    return batch["inputs"], {key: batch[key] for key in DOCUMENT_KEYS if key in batch}


def loss_weight(batch: Mapping[str, jax.Array]) -> jax.Array:
    """max(sum of the batch's loss mask, 1): the loss's denominator (B T without a mask)."""
    if LOSS_MASK not in batch:
        return jnp.asarray(batch["targets"].size, jnp.float32)
    return jnp.maximum(jnp.sum(batch[LOSS_MASK]), 1.0)


def masked_token_sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{"nll": sum m nll, "weight": sum m, "correct": sum m [argmax == target]} over the batch."""
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get(LOSS_MASK)
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return {"nll": jnp.sum(mask * nll), "weight": jnp.sum(mask), "correct": jnp.sum(mask * correct)}


def cross_entropy_loss(graphdef: nnx.GraphDef, params: Params, batch: Mapping[str, jax.Array],
                       buffers: Params | None = None) -> jax.Array:
    """The masked mean next-token cross-entropy (nats) of the model `graphdef` + `params` on `batch`."""
    return model_loss(graphdef, params, buffers, batch)[1][0]


def model_loss(graphdef: nnx.GraphDef, params: Params, buffers: Params | None, batch: Mapping[str, jax.Array],
               *, weight: jax.Array | None = None, penalty_scale: float = 1.0) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(cross-entropy + penalty_scale * the MoE layers' penalties, (cross-entropy, MoE statistics)).

    The cross-entropy is sum(mask * nll) / `weight`; `weight` defaults to this batch's
    `loss_weight` (a micro-batch passes its whole batch's, so the micro-batch losses add up).
    """
    model = _merge(graphdef, params, buffers)
    tokens, documents = model_inputs(batch)
    logits, moe_stats = model.forward(tokens, **documents)
    weight = loss_weight(batch) if weight is None else weight
    loss = masked_token_sums(logits, batch)["nll"] / weight
    return loss + penalty_scale * _moe_penalty(model, moe_stats), (loss, moe_stats)


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

    metrics: "loss" (the masked mean over the batch), "grad_norm" (global L2 norm before clipping) and, given
    the optimiser's `schedule`, "learning_rate" (of this update).
    """
    grad_fn = jax.grad(
        lambda params, buffers, batch, weight, penalty_scale: model_loss(
            graphdef, params, buffers, batch, weight=weight, penalty_scale=penalty_scale),
        has_aux=True)

    def loss_and_grad(params: Params, buffers: Params, batch: dict, weight=None,
                      penalty_scale: float = 1.0) -> tuple[tuple[jax.Array, dict], Params]:
        grads, (loss, moe_stats) = grad_fn(params, buffers, batch, weight, penalty_scale)
        return (loss, moe_stats), grads

    def gradients(params: Params, buffers: Params, batch: dict) -> tuple[tuple[jax.Array, dict], Params]:
        """((masked cross-entropy, mean MoE statistics), gradients) of the whole batch.

        Micro-batch losses are divided by the whole batch's mask total, so they (and their
        gradients) add up; the MoE penalties and statistics are averaged over micro-batches.
        """
        if grad_accum_steps == 1:
            return loss_and_grad(params, buffers, batch)
        weight = loss_weight(batch)
        micro = _micro_batches(batch, grad_accum_steps, batch_sharding.spec, batch_sharding.mesh)

        def micro_step(micro_batch):
            return loss_and_grad(params, buffers, micro_batch, weight, 1.0 / grad_accum_steps)

        def accumulate(carry, micro_batch):
            return jax.tree.map(jnp.add, carry, micro_step(micro_batch)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(micro_step, first))
        ((loss, moe_stats), grads), _ = jax.lax.scan(accumulate, zeros, micro)
        return (loss, jax.tree.map(lambda x: x / grad_accum_steps, moe_stats)), grads

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
    return _in_mesh(batch_sharding.mesh, jax.jit(
        train_step,
        # One sharding for the whole batch (a pytree prefix): every key, "loss_mask" included.
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    ))


def _in_mesh(mesh, step):
    """`step` traced and run with `mesh` in scope (`jax.set_mesh`), where the model finds the "context"
    axis that splits the time axis (`hybrid_jax.nn.context.sharded_mixer`)."""
    def run(*args, **kwargs):
        with jax.set_mesh(mesh):
            return step(*args, **kwargs)
    return run


def make_eval_step(
    graphdef: nnx.GraphDef, *, param_shardings: Params, batch_sharding: NamedSharding,
    buffer_shardings: Params | None = None,
) -> Callable[..., jax.Array]:
    """`eval_step(params, batch, buffers={}) -> masked_token_sums` (nll, weight, correct), jitted.

    Sums, not means, so a pass over several batches adds them up: loss = nll / max(weight, 1),
    accuracy = correct / max(weight, 1).
    """

    def token_sums(params: Params, buffers: Params, batch: dict) -> dict[str, jax.Array]:
        tokens, documents = model_inputs(batch)
        logits, _ = _merge(graphdef, params, buffers).forward(tokens, **documents)
        return masked_token_sums(logits, batch)

    evaluate = _in_mesh(batch_sharding.mesh, jax.jit(
        token_sums,
        in_shardings=(param_shardings, buffer_shardings or {}, batch_sharding),
        out_shardings=NamedSharding(batch_sharding.mesh, PartitionSpec()),
    ))
    return lambda params, batch, buffers=None: evaluate(params, buffers or {}, batch)


__all__ = ["DOCUMENT_KEYS", "LOSS_MASK", "TrainState", "cross_entropy_loss", "loss_weight", "make_eval_step",
           "make_train_step", "masked_token_sums", "model_inputs", "model_loss", "moe_metrics"]
