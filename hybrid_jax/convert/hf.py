"""Llama checkpoints from a Hugging Face folder: `config.json` + `*.safetensors`, read with `safetensors`.

Tensor names (HF `LlamaForCausalLM`): `model.embed_tokens.weight`, `model.norm.weight`,
`lm_head.weight` (absent or ignored when `tie_word_embeddings`), and per layer i
`model.layers.{i}.{input_layernorm, post_attention_layernorm}.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`.
Tensors of any float dtype (bfloat16 included, read through the "flax" framework) become float32.
The folder's `tokenizer.json`, when there is one, becomes the checkpoint's tokenizer.
Supported: `model_type` "llama" with `hidden_act` "silu", no `rope_scaling` and no `mlp_bias`;
anything else is a ValueError naming the value and the supported ones.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from hybrid_jax.convert.llama import LlamaCheckpoint, LlamaSpec, LlamaWeights, check_weights
from hybrid_jax.convert.tokenizer import tokenizer_from_json

SUPPORTED_MODEL_TYPES = ("llama",)
_LAYER_NAMES = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias",
                "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
                "o_bias": "self_attn.o_proj.bias", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
                "down": "mlp.down_proj.weight"}


def _spec(config: dict, path: str) -> LlamaSpec:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported model types are "
                         f"{list(SUPPORTED_MODEL_TYPES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {config['hidden_act']!r} is not supported; supported: ['silu']")
    if config.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling {config['rope_scaling']!r} is not supported; supported: None")
    if config.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=True is not supported; supported: False")
    heads = int(config["num_attention_heads"])
    bias = bool(config.get("attention_bias", False))
    return LlamaSpec(
        vocab_size=int(config["vocab_size"]), d_model=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        mlp_dim=int(config["intermediate_size"]), rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias)


def _read_tensors(folder: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors file")
    tensors = {}
    for file in files:
        with safe_open(file, framework="flax") as f:  # "flax" reads bfloat16, which numpy cannot
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name), np.float32)
    return tensors


def read_hf(folder: str | os.PathLike) -> LlamaCheckpoint:
    """The Llama checkpoint in a Hugging Face folder (config.json + safetensors), in float32."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: no config.json; expected a Hugging Face model folder")
    with open(config_path) as f:
        hf_config = json.load(f)
    spec = _spec(hf_config, config_path)
    tensors = _read_tensors(folder)
    layers = []
    for index in range(spec.num_layers):
        prefix = f"model.layers.{index}."
        layers.append({key: tensors[prefix + name] for key, name in _LAYER_NAMES.items() if prefix + name in tensors})
    weights = LlamaWeights(embed=tensors.get("model.embed_tokens.weight"), final_norm=tensors.get("model.norm.weight"),
                           layers=layers, lm_head=None if spec.tie_embeddings else tensors.get("lm_head.weight"))
    check_weights(spec, weights, folder)
    return LlamaCheckpoint(spec, weights, tokenizer=read_hf_tokenizer(folder, hf_config.get("eos_token_id")),
                           source=folder)


def read_hf_tokenizer(folder: str, eos_id: int | None = None):
    """The folder's tokenizer.json as a Tokenizer, or None when it has none."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    return tokenizer_from_json(path, eos_id=eos_id if isinstance(eos_id, int) else None)
