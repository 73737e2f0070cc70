r"""Stage 1 of LoLCATs, attention transfer: train each layer's feature maps to reproduce its softmax attention.

    python -m hybrid_jax.lolcats.transfer --config experiments/configs/lolcats.py:smollm2

Every softmax layer l of the pretrained model becomes a LoLCATs layer with the same projections
(`hybrid_jax.nn.lolcats`). With x_l the normalised input of layer l's mixer in the *original* model
(teacher forcing: each layer sees the hidden states the pretrained model produces), only the Hedgehog
feature maps and the mixing factors of layer l train, to minimise

    MSE_l = mean (LoLCATs_l(x_l) - SoftmaxAttention_l(x_l))^2          (the mixer outputs, after W_o)

for `transfer.steps` AdamW steps on batches of `transfer.batch_size` training sequences, layer by
layer (each layer restarts its optimiser and schedule). The transfer error of layer l is MSE_l on
`transfer.eval_sequences` further sequences of the training text that no step saw; it ranks the
layers for `hybrid_jax.lolcats.selection`. Every other parameter stays bit-for-bit the pretrained one.

<workdir>/transfer/ holds config.json (the all-LoLCATs model config), a checkpoint after every
layer (resuming restarts at the first layer not done), metrics.jsonl (a record every `log_every`
steps, the layer's last one with "transfer_mse", "transfer_rel" = MSE / mean(target^2) and
"transfer_mse_before", the MSE of the untrained swap),
TensorBoard events and transfer_errors.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.lolcats import training
from hybrid_jax.lolcats.swap import graft_params, layered_config, load_teacher
from hybrid_jax.lolcats.text import load_text, tokenize_splits
from hybrid_jax.models.hybrid_lm import Block
from hybrid_jax.models.layer_params import join_layers, model_params, split_layers
from hybrid_jax.nn import build_mixer, param_roles
from hybrid_jax.nn.lolcats import FEATURE_MAP_PARAMS
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.metrics import MetricsLogger, read_metrics
from hybrid_jax.train.step import TrainState

IS_FEATURE_MAP = training.path_has(FEATURE_MAP_PARAMS)


@dataclasses.dataclass
class TransferResult:
    params: dict  # the all-LoLCATs model's parameters
    model_cfg: object  # its model config
    teacher_params: dict
    teacher_cfg: object
    tokenizer: object
    errors: list[float]  # held-out transfer MSE per layer
    relative_errors: list[float]
    errors_before: list[float]  # the same MSE for the untrained swap (identity feature maps)
    run_dir: str


class _LayerFunctions:
    """The jitted pieces, compiled once for all layers (every layer has the same shapes)."""

    def __init__(self, teacher_cfg, student_mixer_cfg, config):
        teacher_block = nnx.eval_shape(lambda: Block(teacher_cfg.mixers["A"], teacher_cfg, "swiglu",
                                                     rngs=nnx.Rngs(0)))
        self.block_def = nnx.split(teacher_block)[0]
        student = nnx.eval_shape(lambda: build_mixer(student_mixer_cfg, teacher_cfg.d_model, rngs=nnx.Rngs(0)))
        self.student_def = nnx.split(student)[0]
        self.optimizer = training.subset_optimizer(config.transfer, param_roles(student), IS_FEATURE_MAP)
        self.advance = jax.jit(self._advance)
        self.loss = jax.jit(self._loss)
        self.step = training.make_subset_step(self._loss, self.optimizer)

    def _advance(self, block_params, h):
        """(mixer input, teacher mixer output, block output) of one teacher layer."""
        block = nnx.merge(self.block_def, block_params)
        x = block.mixer_norm(h)
        return x, block.mixer(x), block(h)

    def _loss(self, trainable, frozen, batch):
        mixer = nnx.merge(self.student_def, training.merge_trees(trainable, frozen))
        return jnp.mean(jnp.square(mixer(batch["x"]) - batch["y"]))


def _teacher_pass(functions, block_params, hidden: jax.Array, batch: int):
    """`advance` over the sequences of `hidden` in chunks of `batch` rows (bounded memory)."""
    parts = [functions.advance(block_params, hidden[i:i + batch]) for i in range(0, hidden.shape[0], batch)]
    return tuple(jnp.concatenate(column) for column in zip(*parts))


def _train_layer(functions, layer_mixer, data, tc, iterator, logger, progress):
    """Trains one layer's feature maps; returns (mixer params, transfer MSE, relative MSE)."""
    trainable, frozen = training.split_trainable(training.as_jnp(layer_mixer), IS_FEATURE_MAP)
    held_out_mse = lambda: float(np.mean([functions.loss(trainable, frozen, b) for b in data["eval"]]))  # noqa: E731
    mse_before = held_out_mse()  # the swap alone: identity feature maps, gamma = sigmoid(mix_init)
    opt_state = functions.optimizer.init(trainable)
    losses, clock = [], time.perf_counter()
    for _ in range(tc.steps):
        index = np.asarray(next(iterator))
        batch = {"x": data["x"][index], "y": data["y"][index]}
        trainable, opt_state, metrics = functions.step(trainable, opt_state, frozen, batch)
        losses.append(metrics["loss"])
        step = progress["step"] = progress["step"] + 1
        if step % tc.log_every == 0 or step % tc.steps == 0:
            window = [float(x) for x in losses]
            losses, elapsed = [], time.perf_counter() - clock
            rate = len(window) * tc.batch_size * tc.seq_len / elapsed
            extra = {}
            if step % tc.steps == 0:
                mse, scale = held_out_mse(), float(np.mean([jnp.mean(jnp.square(b["y"])) for b in data["eval"]]))
                extra = {"transfer_mse": mse, "transfer_rel": mse / scale, "transfer_mse_before": mse_before}
            so_far = time.perf_counter() - progress["start"]  # teacher passes and checkpoints included
            logger.train(step, loss=float(np.mean(window)), tokens_per_sec=rate,
                         eta_sec=(progress["total"] - step) * so_far / (step - progress["first"]),
                         elapsed_sec=so_far, layer=progress["layer"],
                         grad_norm=float(metrics["grad_norm"]), **extra)
            clock = time.perf_counter()
    params = jax.tree.map(np.asarray, training.merge_trees(trainable, frozen))
    return params, extra["transfer_mse"], extra["transfer_rel"]


def _eval_batches(x, y, batch: int) -> list[dict]:
    return [{"x": x[i:i + batch], "y": y[i:i + batch]} for i in range(0, x.shape[0] - batch + 1, batch)]


def run_transfer(config, teacher=None) -> TransferResult:
    """Stage 1 over every layer (resuming from `<workdir>/transfer`); `teacher` = (model, model
    config, tokenizer) skips loading `config.source` again."""
    teacher_model, teacher_cfg, tokenizer = teacher or load_teacher(config.source)
    tc, run_dir = config.transfer, os.path.join(config.workdir, "transfer")
    splits = tokenize_splits(load_text(config.text.source), tokenizer, config.text.held_out_fraction)
    tokens = splits.windows("train", tc.seq_len, tc.train_sequences + tc.eval_sequences)
    num_layers = teacher_cfg.num_layers
    student_cfg = layered_config(teacher_cfg, ["lolcats"] * num_layers, config.lolcats)
    teacher_params = model_params(teacher_model)
    _, teacher_layers = split_layers(teacher_params, period=len(teacher_cfg.pattern), num_layers=num_layers)
    params = graft_params(teacher_params, teacher_cfg, student_cfg, seed=config.seed)
    globals_, layers = split_layers(params, period=1, num_layers=num_layers)
    functions = _LayerFunctions(teacher_cfg, student_cfg.mixers["L"], config)

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2)
    iterator = training.batch_indices(tc.train_sequences, tc.batch_size, config.seed)
    start = checkpointer.latest_step() or 0
    if start:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract, opt_state={})
        restored = checkpointer.restore(start, state, iterator)
        layers = split_layers(jax.tree.map(np.asarray, restored.params), period=1, num_layers=num_layers)[1]
    training.write_run_config(run_dir, student_cfg, config)
    logger = MetricsLogger(run_dir, total_steps=num_layers * tc.steps, start_step=start)
    done = start // tc.steps
    hidden = teacher_model.embed(jnp.asarray(tokens), jnp.float32)
    progress = {"step": start, "first": start, "total": num_layers * tc.steps, "start": time.perf_counter()}
    for layer in range(num_layers):
        x, y, next_hidden = _teacher_pass(functions, teacher_layers[layer], hidden, tc.batch_size)
        if layer >= done:
            data = {"x": x[:tc.train_sequences], "y": y[:tc.train_sequences],
                    "eval": _eval_batches(x[tc.train_sequences:], y[tc.train_sequences:], tc.batch_size)}
            progress["layer"] = layer
            layers[layer]["mixer"], mse, rel = _train_layer(functions, layers[layer]["mixer"], data, tc, iterator,
                                                            logger, progress)
            logger.message(f"layer {layer + 1}/{num_layers}: held-out transfer MSE {mse:.3e} ({rel:.3%} of the "
                           "attention output's mean square)")
            state = TrainState(step=jnp.int32(progress["step"]), params=join_layers(globals_, layers, period=1),
                               opt_state={})
            checkpointer.save(progress["step"], state, iterator)
        hidden = next_hidden
    checkpointer.wait_until_finished()
    checkpointer.close()
    logger.close()
    table = _errors_from_metrics(run_dir, num_layers)
    return TransferResult(join_layers(globals_, layers, period=1), student_cfg, teacher_params, teacher_cfg,
                          tokenizer, table["transfer_mse"], table["transfer_rel"], table["transfer_mse_before"],
                          run_dir)


def _errors_from_metrics(run_dir: str, num_layers: int) -> dict[str, list[float]]:
    """Per-layer transfer errors from metrics.jsonl (resumed runs included); writes transfer_errors.json."""
    records = {int(r["layer"]): r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
               if "transfer_mse" in r}
    missing = [layer for layer in range(num_layers) if layer not in records]
    if missing:
        raise ValueError(f"{run_dir}/metrics.jsonl has no transfer error for layers {missing}")
    table = {key: [records[layer][key] for layer in range(num_layers)]
             for key in ("transfer_mse", "transfer_rel", "transfer_mse_before")}
    with open(os.path.join(run_dir, "transfer_errors.json"), "w") as f:
        json.dump(table, f, indent=2)
    return table


if __name__ == "__main__":
    from hybrid_jax.lolcats import cli

    cli.run(run_transfer)
