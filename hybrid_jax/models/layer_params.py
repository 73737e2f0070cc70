"""HybridLM parameters layer by layer: split a parameter tree into per-layer trees and join them back.

`nnx.to_pure_dict(nnx.state(model, nnx.Param))` stores the blocks of the scanned periods stacked on a
leading axis (`periods.blocks[b]`, layer l = p * P + b at index p, P the pattern period) and the lead
periods (MoE models) one by one (`lead_periods[i].blocks[b]`). Converting checkpoints, swapping the
mixer of one layer and ranking layers all think in layers, so

    globals, layers = split_layers(params, period=P, num_layers=L)   # layers[l]: that layer's block
    params = join_layers(globals, layers, period=P', num_lead=0)     # any pattern period P' dividing L

moves between the two views; `model_with_params(model_cfg, params)` builds the model of a config
around a parameter tree without initialising parameters it would then throw away.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hybrid_jax.models.hybrid_lm import HybridLM, build_model

_LAYER_KEYS = ("periods", "lead_periods")


def split_layers(params: dict, *, period: int, num_layers: int) -> tuple[dict, list[dict]]:
    """(the parameters outside the blocks, one block parameter tree per layer in depth order)."""
    globals_ = {key: value for key, value in params.items() if key not in _LAYER_KEYS}
    lead = params.get("lead_periods", {})
    layers = [lead[p]["blocks"][b] for p in sorted(lead) for b in range(period)]
    stacked = params.get("periods", {}).get("blocks", {})
    scanned = (num_layers - len(layers)) // period
    for p in range(scanned):
        layers += [jax.tree.map(lambda x, p=p: x[p], stacked[b]) for b in range(period)]
    if len(layers) != num_layers:
        raise ValueError(f"split_layers: found {len(layers)} layers, expected {num_layers}")
    return globals_, layers


def join_layers(globals_: dict, layers: list[dict], *, period: int, num_lead: int = 0) -> dict:
    """The parameter tree of a model with pattern period `period` whose layer l holds `layers[l]`
    (the first `num_lead` periods unstacked, the rest stacked); inverse of `split_layers`."""
    if len(layers) % period:
        raise ValueError(f"join_layers: {len(layers)} layers are not a multiple of the period {period}")
    params = dict(globals_)
    if num_lead:
        params["lead_periods"] = {p: {"blocks": {b: layers[p * period + b] for b in range(period)}}
                                  for p in range(num_lead)}
    rest = layers[num_lead * period:]
    if rest:
        stack = lambda *xs: np.stack([np.asarray(x) for x in xs])  # noqa: E731
        params["periods"] = {"blocks": {b: jax.tree.map(stack, *rest[b::period]) for b in range(period)}}
    return params


def model_with_params(model_cfg: ml_collections.ConfigDict, params: dict) -> HybridLM:
    """The model `model_cfg` builds, holding `params` (a pure dict shaped like its parameters; a
    missing or misshaped entry is a ValueError naming it)."""
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    expected = nnx.to_pure_dict(abstract_params)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    flat_given = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, leaf in flat_expected.items():
        name = jax.tree_util.keystr(path)
        if path not in flat_given:
            raise ValueError(f"model_with_params: parameter {name} {tuple(leaf.shape)} is missing")
        if tuple(np.shape(flat_given[path])) != tuple(leaf.shape):
            raise ValueError(f"model_with_params: parameter {name} has shape {np.shape(flat_given[path])}, "
                             f"the model expects {tuple(leaf.shape)}")
    extra = sorted(jax.tree_util.keystr(p) for p in set(flat_given) - set(flat_expected))
    if extra:
        raise ValueError(f"model_with_params: parameters {extra[:5]} are not in the model")
    arrays = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    nnx.replace_by_pure_dict(abstract_params, arrays)
    return nnx.merge(graphdef, abstract_params, rest)


def model_params(model: HybridLM) -> dict:
    """The model's parameters as a pure dict (the tree `split_layers` reads)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
