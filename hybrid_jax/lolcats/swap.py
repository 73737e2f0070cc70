"""Swapping mixers layer by layer: softmax attention -> LoLCATs, adapters on, hybrids of both.

A linearised model is a HybridLM whose layer l has mixer kind `kinds[l]` ("attention" or "lolcats").
Its config (`layered_config`) uses one pattern letter per kind: "A" for attention, "L" for LoLCATs;
the pattern is a single letter when every layer has the same kind (one scanned block, as the
original) and otherwise the full per-layer string (one period spanning the depth).

`graft_params` carries a trained model's parameters over to another config layer by layer: every
parameter whose path exists in both is copied; parameters only the new layer has (feature maps and
mixing factors of a new LoLCATs layer, LoRA adapters) come from a fresh initialisation of that
layer (identity feature maps, zero LoRA B, so the swap changes nothing but what it must).
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from hybrid_jax.convert import (
    read_gguf,
    read_gguf_tokenizer,
    read_hf,
    read_hf_tokenizer,
    smollm2_path,
    to_hybrid,
)
from hybrid_jax.models.layer_params import join_layers, split_layers
from hybrid_jax.nn import build_mixer, mixer_config

LETTERS = {"attention": "A", "lolcats": "L"}
# attention keys a LoLCATs layer inherits (the projections, RoPE, heads and adapters)
_SHARED_KEYS = ("num_heads", "num_kv_heads", "head_dim", "rope", "rope_theta", "rope_fraction", "qkv_bias",
                "o_bias", "lora_rank", "lora_alpha", "lora_targets")


def _source_path(source: str) -> str:
    path = smollm2_path() if source == "smollm2" else source
    if not (os.path.isdir(path) or str(path).endswith(".gguf")):
        raise ValueError(f"source: {source!r} is not valid; valid values are 'smollm2', a .gguf file or a "
                         "Hugging Face folder (config.json + *.safetensors)")
    return path


def _require_tokenizer(tokenizer, path: str):
    if tokenizer is None:
        raise ValueError(f"source: {path} carries no tokenizer (GGUF tokenizer metadata or a tokenizer.json); "
                         "the LoLCATs stages tokenise text with the model's own tokenizer")
    return tokenizer


def load_teacher(source: str):
    """(HybridLM, its model config, tokenizer) of `source`: "smollm2", a .gguf file or a HF folder."""
    path = _source_path(source)
    checkpoint = read_hf(path) if os.path.isdir(path) else read_gguf(path)
    model, model_cfg = to_hybrid(checkpoint)
    return model, model_cfg, _require_tokenizer(checkpoint.tokenizer, path)


def load_tokenizer(source: str):
    """Only the tokenizer of `source` (no weights are read)."""
    path = _source_path(source)
    return _require_tokenizer(read_hf_tokenizer(path) if os.path.isdir(path) else read_gguf_tokenizer(path), path)


def lolcats_mixer(attention_cfg, lolcats_section) -> ml_collections.ConfigDict:
    """The LoLCATs mixer config replacing `attention_cfg` (its projections, with `lolcats_section`'s
    window / feature maps / op settings)."""
    if attention_cfg.get("qk_norm") or attention_cfg.get("window") is not None:
        raise ValueError("model.mixers.A: LoLCATs replaces global softmax attention without qk_norm; "
                         f"got qk_norm={attention_cfg.get('qk_norm')}, window={attention_cfg.get('window')}")
    shared = {key: attention_cfg[key] for key in _SHARED_KEYS}
    return mixer_config("lolcats", **shared, **dict(lolcats_section))


def layered_config(base_cfg, kinds: list[str], lolcats_section, *, lora: dict | None = None):
    """The model config of `base_cfg` (a pattern-"A" Llama) with mixer `kinds[l]` at layer l, and LoRA
    keys (`lora_rank`, `lora_alpha`, `lora_targets`) on every mixer when `lora` is given."""
    if len(kinds) != base_cfg.num_layers or set(kinds) - set(LETTERS):
        raise ValueError(f"kinds must name one of {sorted(LETTERS)} for each of the {base_cfg.num_layers} layers, "
                         f"got {kinds}")
    attention = base_cfg.mixers["A"]
    mixers = {"A": mixer_config("attention", **{k: v for k, v in attention.items() if k != "kind"}),
              "L": lolcats_mixer(attention, lolcats_section)}
    pattern = "".join(LETTERS[kind] for kind in kinds)
    cfg = ml_collections.ConfigDict(base_cfg.to_dict())
    cfg.pattern = pattern[0] if len(set(pattern)) == 1 else pattern
    cfg.mixers = {letter: mixers[letter] for letter in sorted(set(pattern))}
    return with_lora(cfg, lora) if lora else cfg


def with_lora(model_cfg, lora: dict):
    """`model_cfg` with the LoRA keys of `lora` (`lora_rank`, `lora_alpha`, `lora_targets`) on every mixer."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.mixers = {letter: mixer_config(mixer.kind, **{**{k: v for k, v in mixer.items() if k != "kind"}, **lora})
                  for letter, mixer in model_cfg.mixers.items()}
    return cfg


def layer_kinds(model_cfg) -> list[str]:
    """The mixer kind of every layer of `model_cfg`."""
    period = model_cfg.pattern
    letters = period * (model_cfg.num_layers // len(period))
    return [model_cfg.mixers[letter].kind for letter in letters]


def _graft(old: dict, fresh: dict) -> dict:
    """`fresh` with every entry that `old` also has (same path and shape) taken from `old`."""
    if not isinstance(fresh, dict):
        if old is None or np.shape(old) != np.shape(fresh):
            return fresh
        return old
    return {key: _graft(old.get(key) if isinstance(old, dict) else None, value) for key, value in fresh.items()}


def fresh_mixer_params(mixer_cfg, d_model: int, seed: int) -> dict:
    """A freshly initialised mixer's parameters (pure dict)."""
    layer = build_mixer(mixer_cfg, d_model, rngs=nnx.Rngs(seed))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


def graft_params(params: dict, old_cfg, new_cfg, *, seed: int = 0) -> dict:
    """`params` of a model of `old_cfg` carried over to `new_cfg` layer by layer (module docstring)."""
    globals_, layers = split_layers(params, period=len(old_cfg.pattern), num_layers=old_cfg.num_layers)
    new_period = new_cfg.pattern * (new_cfg.num_layers // len(new_cfg.pattern))
    grafted = []
    for index, (layer, letter) in enumerate(zip(layers, new_period)):
        fresh = fresh_mixer_params(new_cfg.mixers[letter], new_cfg.d_model, seed + index)
        grafted.append({**layer, "mixer": _graft(layer["mixer"], fresh)})
    return join_layers(globals_, grafted, period=len(new_cfg.pattern))
