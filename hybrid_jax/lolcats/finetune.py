r"""Stage 2 of LoLCATs: LoRA on the linearised model's next-token loss.

    python -m hybrid_jax.lolcats.finetune --config experiments/lolcats/config.py:smollm2

Starts from stage 1's model (`<workdir>/transfer`, or a `TransferResult` in memory), puts LoRA
adapters (`hybrid_jax.nn.lora`: rank `finetune.lora_rank`, scale alpha / rank, on the projections
named by `finetune.lora_targets`, by default q, k, v, o of every layer) and trains only the adapters
on the mean next-token cross-entropy of training-text windows of `finetune.seq_len` tokens. Every
pretrained weight and every stage-1 feature map stays bit-for-bit what it was; `merge_lora_params`
folds the adapters into the kernels afterwards (same outputs, plain model).

<workdir>/finetune/ holds config.json (the model with adapters), checkpoints (every
`checkpoint_every` steps and at the end; rerunning resumes), metrics.jsonl with train records and
a final held-out eval record, and TensorBoard events.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.inference.checkpoint import load_model
from hybrid_jax.lolcats import training
from hybrid_jax.lolcats.evaluate import heldout_nll, next_token_batch
from hybrid_jax.lolcats.swap import graft_params, load_tokenizer, with_lora
from hybrid_jax.lolcats.text import load_text, tokenize_splits
from hybrid_jax.models import build_model
from hybrid_jax.models.layer_params import model_params
from hybrid_jax.nn import param_roles
from hybrid_jax.nn.lora import LORA_KEYS
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.metrics import MetricsLogger
from hybrid_jax.train.step import TrainState, cross_entropy_loss

IS_ADAPTER = training.path_has(LORA_KEYS)


@dataclasses.dataclass
class FinetuneResult:
    params: dict  # with the adapters (unmerged)
    model_cfg: object
    run_dir: str
    heldout_nll: float


def _start_model(config, stage1):
    """(stage-1 params, stage-1 model config, tokenizer)."""
    if stage1 is not None:
        return stage1.params, stage1.model_cfg, stage1.tokenizer
    model, run_config, _ = load_model(os.path.join(config.workdir, "transfer"))
    tokenizer = load_tokenizer(config.source)
    return jax.tree.map(np.asarray, model_params(model)), run_config.model, tokenizer


def _restore_or_start(checkpointer, params, optimizer, iterator):
    trainable, frozen = training.split_trainable(training.as_jnp(params), IS_ADAPTER)
    start = checkpointer.latest_step() or 0
    if not start:
        return 0, trainable, frozen, optimizer.init(trainable)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device)  # noqa: E731
    abstract = TrainState(step=on_device(jnp.int32(0)), params=jax.tree.map(on_device, training.as_jnp(params)),
                          opt_state=jax.tree.map(on_device, jax.eval_shape(optimizer.init, trainable)))
    state = checkpointer.restore(start, abstract, iterator)
    trainable, _ = training.split_trainable(state.params, IS_ADAPTER)
    return start, trainable, frozen, state.opt_state


def run_finetune(config, stage1=None) -> FinetuneResult:
    """Stage 2 (resuming from `<workdir>/finetune`); `stage1` is a TransferResult to start from."""
    fc, run_dir = config.finetune, os.path.join(config.workdir, "finetune")
    params, stage1_cfg, tokenizer = _start_model(config, stage1)
    model_cfg = with_lora(stage1_cfg, {"lora_rank": fc.lora_rank, "lora_alpha": float(fc.lora_alpha),
                                       "lora_targets": fc.lora_targets})
    params = graft_params(params, stage1_cfg, model_cfg, seed=config.seed + 1)
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract)[0]
    optimizer = training.subset_optimizer(fc, param_roles(abstract), IS_ADAPTER)
    splits = tokenize_splits(load_text(config.text.source), tokenizer, config.text.held_out_fraction)
    windows = splits.windows("train", fc.seq_len + 1, len(splits.train) // (fc.seq_len + 1))
    iterator = training.batch_indices(len(windows), fc.batch_size, config.seed)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2)
    start, trainable, frozen, opt_state = _restore_or_start(checkpointer, params, optimizer, iterator)
    training.write_run_config(run_dir, model_cfg, config)
    logger = MetricsLogger(run_dir, total_steps=fc.steps, start_step=start)

    def loss_fn(trainable, frozen, batch):
        return cross_entropy_loss(graphdef, training.merge_trees(trainable, frozen), batch)

    step_fn = training.make_subset_step(loss_fn, optimizer)
    losses, clock, began = [], time.perf_counter(), time.perf_counter()
    for step in range(start + 1, fc.steps + 1):
        trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen,
                                                next_token_batch(windows[np.asarray(next(iterator))]))
        losses.append(metrics["loss"])
        if step % fc.log_every == 0 or step == fc.steps:
            window, elapsed = [float(x) for x in losses], time.perf_counter() - clock
            logger.train(step, loss=float(np.mean(window)), grad_norm=float(metrics["grad_norm"]),
                         tokens_per_sec=len(window) * fc.batch_size * fc.seq_len / elapsed,
                         eta_sec=(fc.steps - step) * elapsed / len(window), elapsed_sec=time.perf_counter() - began)
            losses, clock = [], time.perf_counter()
        if step % fc.checkpoint_every == 0 or step == fc.steps:
            state = TrainState(step=jnp.int32(step), params=training.merge_trees(trainable, frozen),
                               opt_state=opt_state)
            checkpointer.save(step, state, iterator)
    checkpointer.wait_until_finished()
    checkpointer.close()
    params = jax.tree.map(np.asarray, training.merge_trees(trainable, frozen))
    text = config.text
    held_out = splits.windows("held_out", text.eval_seq_len + 1, text.eval_sequences)
    nll = heldout_nll(model_cfg, params, held_out)
    bytes_per_token = float(np.mean(tokenizer.token_byte_lengths()[held_out[:, 1:]]))
    logger.eval(fc.steps, loss=nll, bits_per_byte=nll / math.log(2) / bytes_per_token, batches=len(held_out),
                final=True)
    logger.close()
    return FinetuneResult(params, model_cfg, run_dir, nll)


if __name__ == "__main__":
    from hybrid_jax.lolcats import cli

    cli.run(run_finetune)
