r"""Which layers keep softmax attention: chosen by transfer error, against evenly spaced ones.

After stage 1 every layer l has held-out transfer errors (`hybrid_jax.lolcats.transfer`): how far its
best linearisation stays from its softmax attention, in absolute terms and relative to the size of
what it imitates:

    raw MSE_l       = mean (LoLCATs_l(x_l) - Attention_l(x_l))^2
    relative MSE_l  = raw MSE_l / mean Attention_l(x_l)^2

A hybrid with N softmax layers keeps, by rule (`selection.rule`),

    "relative"  the N layers with the largest relative MSE (the default)
    "raw"       the N layers with the largest raw MSE
    "even"      layers floor((i + 1/2) L / N), i = 0 .. N-1 (the fixed-ratio recipe of hybrid models)

and linearises the others. The raw MSE grows with the scale of the attention outputs, which grows
with depth in a pre-norm residual stack, so it mostly ranks the last layers first; the relative
MSE compares layers on one scale (see the README's LoLCATs report for how the rules fare).
Softmax layers take the pretrained attention weights, linearised ones their stage-1 weights.

    python -m hybrid_jax.lolcats.selection --config experiments/lolcats/config.py:smollm2

reads <workdir>/transfer (model and transfer_errors.json) and writes the hybrid with
N = `selection.num_softmax` chosen by `selection.rule` as a run folder <workdir>/hybrid_<rule>_N<N>
(config.json + checkpoint), which `hybrid_jax.inference.load_model` loads.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.lolcats import training
from hybrid_jax.lolcats.swap import layer_kinds, layered_config
from hybrid_jax.models.layer_params import join_layers, split_layers

RULES = ("relative", "raw", "even")


def ranked_layers(errors, count: int) -> list[int]:
    """The `count` layers with the largest transfer error, in depth order."""
    if not 0 <= count <= len(errors):
        raise ValueError(f"num_softmax: {count} must be in [0, {len(errors)}] (the number of layers)")
    order = sorted(range(len(errors)), key=lambda layer: (-errors[layer], layer))
    return sorted(order[:count])


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """`count` layers spread evenly over the depth (module docstring)."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"num_softmax: {count} must be in [0, {num_layers}] (the number of layers)")
    return [int((i + 0.5) * num_layers / count) for i in range(count)]


def softmax_layers(rule: str, count: int, *, raw: list[float], relative: list[float]) -> list[int]:
    """The layers rule `rule` keeps as softmax (module docstring), from the per-layer errors."""
    if rule not in RULES:
        raise ValueError(f"selection.rule: {rule!r} is not valid; valid rules are {list(RULES)}")
    if rule == "even":
        return evenly_spaced_layers(len(raw), count)
    return ranked_layers(relative if rule == "relative" else raw, count)


def hybrid(teacher_params: dict, teacher_cfg, linear_params: dict, linear_cfg, keep: list[int], lolcats_section):
    """(model config, parameters) of the hybrid keeping layers `keep` softmax (teacher weights) and the
    others linearised (weights of the all-LoLCATs model `linear_params`)."""
    num_layers = teacher_cfg.num_layers
    kinds = ["attention" if layer in keep else "lolcats" for layer in range(num_layers)]
    cfg = layered_config(teacher_cfg, kinds, lolcats_section)
    teacher_globals, teacher_layers = split_layers(teacher_params, period=len(teacher_cfg.pattern),
                                                   num_layers=num_layers)
    _, linear_layers = split_layers(linear_params, period=len(linear_cfg.pattern), num_layers=num_layers)
    layers = [teacher_layers[i] if kind == "attention" else linear_layers[i] for i, kind in enumerate(kinds)]
    return cfg, join_layers(teacher_globals, layers, period=len(cfg.pattern))


def write_hybrid(config) -> str:
    """The `python -m` entry: builds the error-ranked hybrid from <workdir>/transfer; returns its folder."""
    from hybrid_jax.inference.checkpoint import load_model
    from hybrid_jax.lolcats.swap import load_teacher
    from hybrid_jax.models.layer_params import model_params
    from hybrid_jax.train.checkpoint import Checkpointer
    from hybrid_jax.train.step import TrainState

    transfer_dir = os.path.join(config.workdir, "transfer")
    with open(os.path.join(transfer_dir, "transfer_errors.json")) as f:
        errors = json.load(f)
    linear_model, run_config, _ = load_model(transfer_dir)
    if set(layer_kinds(run_config.model)) != {"lolcats"}:
        raise ValueError(f"{transfer_dir} does not hold an all-LoLCATs model")
    teacher_model, teacher_cfg, _ = load_teacher(config.source)
    sc = config.selection
    keep = softmax_layers(sc.rule, sc.num_softmax, raw=errors["transfer_mse"], relative=errors["transfer_rel"])
    cfg, params = hybrid(model_params(teacher_model), teacher_cfg, model_params(linear_model), run_config.model,
                         keep, config.lolcats)
    run_dir = os.path.join(config.workdir, f"hybrid_{sc.rule}_N{sc.num_softmax}")
    training.write_run_config(run_dir, cfg, config)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1)
    state = TrainState(step=jnp.int32(0), params=jax.tree.map(np.asarray, params), opt_state={})
    checkpointer.save(0, state, training.batch_indices(1, 1, 0))
    checkpointer.wait_until_finished()
    checkpointer.close()
    print(f"softmax layers {keep} (rule {sc.rule!r}); hybrid written to {run_dir}")
    return run_dir


if __name__ == "__main__":
    from hybrid_jax.lolcats import cli

    cli.run(write_hybrid)
