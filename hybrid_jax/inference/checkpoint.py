"""Loading a trained model from a training run's workdir, for decoding.

A run of `python -m hybrid_jax.train` (hybrid_jax.train.loop) leaves

    <workdir>/config.json                         the run's config (`ConfigDict.to_json_best_effort`)
    <workdir>/checkpoints/<step>/state/           {"step", "params", "opt_state"} (orbax PyTree)
    <workdir>/checkpoints/<step>/data_iter/       grain iterator positions

Decoding needs only the parameters (and, for MoE models with auxiliary-loss-free balancing, the
"buffers" subtree: the routing biases), so `load_model` restores those subtrees of the `state`
item (an orbax partial restore: the optimiser moments, twice the size of the model, are never
read) onto one device, into the model that `config.model` builds.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from hybrid_jax.config import get_default_config, validate_model
from hybrid_jax.models import build_model
from hybrid_jax.models.hybrid_lm import HybridLM
from hybrid_jax.nn import MIXERS
from hybrid_jax.nn.moe import ExpertBias

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"  # the item name `hybrid_jax.train.checkpoint.Checkpointer` saves the train state under


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved in `workdir`; its model section validated."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--workdir {workdir!r} holds no {CONFIG_FILE}; pass the workdir of a "
                         f"`python -m hybrid_jax.train` run")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    # A run written before a model key existed (e.g. model.moe) decodes as it trained: the key's default.
    defaults = get_default_config().model
    for key in defaults.keys():
        if key not in config.model:
            config.model[key] = defaults[key]
    _fill_legacy_mixer_defaults(config.model.mixers)
    validate_model(config.model)
    return config


def _fill_legacy_mixer_defaults(mixers) -> None:
    """A mixer key whose default changed behaviour (`Mixer.LEGACY_DEFAULTS`, e.g. KDA's gate_lower_bound)
    and that a saved mixer config lacks gets the value reproducing what that config computed. Malformed
    sections are left for `validate_model` to report."""
    for mixer_cfg in (mixers.values() if hasattr(mixers, "values") else ()):
        kind = mixer_cfg.get("kind") if hasattr(mixer_cfg, "get") else None
        for key, value in (MIXERS[kind].LEGACY_DEFAULTS if isinstance(kind, str) and kind in MIXERS else {}).items():
            if key not in mixer_cfg:
                mixer_cfg[key] = value


def load_model(workdir: str, step: int | None = None) -> tuple[HybridLM, ml_collections.ConfigDict, int]:
    """(model with the parameters of checkpoint `step` (default: the newest), run config, step)."""
    config = load_run_config(workdir)
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise ValueError(f"--workdir {workdir!r} has no {CHECKPOINT_DIR}/ folder: the run saved no checkpoint")
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, abstract_buffers = nnx.split(abstract, nnx.Param, ExpertBias)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)  # noqa: E731
    target = {"params": jax.tree.map(on_device, nnx.to_pure_dict(abstract_params))}
    buffers = nnx.to_pure_dict(abstract_buffers)
    if buffers:
        target["buffers"] = jax.tree.map(on_device, buffers)
    manager = ocp.CheckpointManager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ValueError(f"{directory} holds no checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; saved steps are {steps}")
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: restore}))
    finally:
        manager.close()
    nnx.replace_by_pure_dict(abstract_params, restored[STATE_ITEM]["params"])
    if buffers:
        nnx.replace_by_pure_dict(abstract_buffers, restored[STATE_ITEM]["buffers"])
    return nnx.merge(graphdef, abstract_params, abstract_buffers), config, step


__all__ = ["load_model", "load_run_config"]
