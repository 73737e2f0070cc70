"""What both LoLCATs stages share: training a subset of a parameter tree, batches, run folders.

A stage trains a few parameters (feature maps and mixing factors; LoRA adapters) of a frozen model.
Parameters are pure dicts (`nnx.to_pure_dict`); `split_trainable` cuts one into the trainable part
and the frozen rest by path, `merge_trees` joins them inside the loss, and `make_subset_step` jits
one optimiser step on the trainable part only, so the frozen part is never touched, not even by
weight decay. The optimiser is `hybrid_jax.train.optim.make_optimizer` on the stage's config
section; checkpoints are `hybrid_jax.train.checkpoint.Checkpointer` (state + the grain iterator
of batch indices, so a resumed run draws the same batches) and metrics `MetricsLogger`.

Run folder (laid out as `python -m hybrid_jax.train` leaves it, so `hybrid_jax.inference.load_model`
loads the model; the tokenizer is the pretrained checkpoint's, `hybrid_jax.lolcats.swap.load_tokenizer`):

    <run>/config.json   {"model": the model section of the stage's result, "lolcats": the stage config}
    <run>/checkpoints/  <run>/metrics.jsonl  <run>/tensorboard/
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybrid_jax.train.optim import make_optimizer

Params = dict


def split_trainable(tree: Params, is_trainable: Callable[[tuple], bool]) -> tuple[Params, Params]:
    """(the leaves whose path satisfies `is_trainable`, the others), each as a nested dict."""
    flat = nnx.traversals.flatten_mapping(tree)
    trainable = {path: leaf for path, leaf in flat.items() if is_trainable(path)}
    frozen = {path: leaf for path, leaf in flat.items() if not is_trainable(path)}
    return nnx.traversals.unflatten_mapping(trainable), nnx.traversals.unflatten_mapping(frozen)


def merge_trees(a: Params, b: Params) -> Params:
    """The union of two nested dicts with disjoint leaves."""
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merge_trees(merged[key], value) if key in merged and isinstance(value, dict) else value
    return merged


def path_has(names) -> Callable[[tuple], bool]:
    """A predicate: the path passes through one of `names`."""
    names = set(names)
    return lambda path: any(str(part) in names for part in path)


def make_subset_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """jit of (trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics) for
    `loss_fn(trainable, frozen, batch) -> scalar`."""

    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))  # before clipping
        metrics = {"loss": loss, "grad_norm": grad_norm}
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def subset_optimizer(section, roles: Params, is_trainable: Callable[[tuple], bool]) -> optax.GradientTransformation:
    """`make_optimizer` for the trainable subset (its weight-decay roles)."""
    return make_optimizer(section, split_trainable(roles, is_trainable)[0])[0]


def batch_indices(num_items: int, batch_size: int, seed: int) -> grain.DatasetIterator:
    """A checkpointable iterator of `[batch_size]` index batches, shuffled per epoch, that does not run
    out (2**40 indices; grain's endless `repeat()` overflows `len` once batched by one)."""
    epochs = max(1, 2**40 // num_items)
    dataset = grain.MapDataset.range(num_items).shuffle(seed=seed).repeat(epochs).batch(batch_size)
    return iter(dataset.to_iter_dataset())


def write_run_config(run_dir: str, model_cfg, stage_config) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"model": json.loads(model_cfg.to_json_best_effort()),
                   "lolcats": json.loads(stage_config.to_json_best_effort())}, f, indent=2)


def as_jnp(tree):
    return jax.tree.map(lambda x: jnp.asarray(x), tree)
