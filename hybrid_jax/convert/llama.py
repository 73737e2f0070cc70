r"""The Llama architecture in HybridLM terms: a checkpoint-neutral spec, weights, and the mapping.

A Llama decoder (Llama 2/3, SmolLM, TinyLlama, ...) is a HybridLM with pattern "A" (softmax
attention with GQA and full-width RoPE, rotate-half layout), SwiGLU feed-forward blocks and RMSNorm:

    h = E[tokens];  for each layer:  h += o_proj(attn(rope(q_proj x), rope(k_proj x), v_proj x)),
                                        x = RMSNorm(h; eps) * w_attn
                                     h += down(silu(gate x') * up x'),   x' = RMSNorm(h; eps) * w_ffn
    logits = (RMSNorm(h) * w_final) E^T   (tied)   or   ... W_lm_head^T

`LlamaWeights` holds the tensors in the Hugging Face layout (float32 numpy, linear weights
`[out, in]`, q/k rows in rotate-half order); the GGUF reader undoes llama.cpp's row permutation
before it builds one. `to_hybrid(checkpoint)` returns the HybridLM config (model section) and the
model holding the weights; kernels are transposed to `[in, out]` and split per head.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from hybrid_jax.config import get_default_config, mixer
from hybrid_jax.models.hybrid_lm import HybridLM
from hybrid_jax.models.layer_params import join_layers, model_with_params

LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
BIAS_TENSORS = ("q_bias", "k_bias", "v_bias")


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The hyperparameters that fix a Llama model's shapes and numerics."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The HF-layout shape of every per-layer tensor this spec needs."""
        d, q_dim, kv_dim = self.d_model, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"attn_norm": (d,), "q": (q_dim, d), "k": (kv_dim, d), "v": (kv_dim, d), "o": (d, q_dim),
                  "ffn_norm": (d,), "gate": (self.mlp_dim, d), "up": (self.mlp_dim, d), "down": (d, self.mlp_dim)}
        if self.qkv_bias:
            shapes.update(q_bias=(q_dim,), k_bias=(kv_dim,), v_bias=(kv_dim,))
        if self.o_bias:
            shapes["o_bias"] = (d,)
        return shapes


@dataclasses.dataclass
class LlamaWeights:
    """HF-layout float32 tensors: embed `[V, d]`, final_norm `[d]`, lm_head `[V, d]` (None when tied),
    and per layer a dict keyed by `LAYER_TENSORS` (+ the bias names when the spec has biases)."""

    embed: np.ndarray
    final_norm: np.ndarray
    layers: list[dict[str, np.ndarray]]
    lm_head: np.ndarray | None = None


@dataclasses.dataclass
class LlamaCheckpoint:
    spec: LlamaSpec
    weights: LlamaWeights
    tokenizer: object = None  # a hybrid_jax.data.tokenizers.Tokenizer when the file carries one
    source: str = ""


def check_weights(spec: LlamaSpec, weights: LlamaWeights, source: str) -> None:
    """ValueError naming the first tensor whose shape (or presence) does not match `spec`."""
    def expect(name: str, array, shape) -> None:
        if array is None:
            raise ValueError(f"{source}: tensor {name} is missing (expected shape {shape})")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")

    expect("embed", weights.embed, (spec.vocab_size, spec.d_model))
    expect("final_norm", weights.final_norm, (spec.d_model,))
    if not spec.tie_embeddings:
        expect("lm_head", weights.lm_head, (spec.vocab_size, spec.d_model))
    if len(weights.layers) != spec.num_layers:
        raise ValueError(f"{source}: found {len(weights.layers)} layers, the config says {spec.num_layers}")
    for index, layer in enumerate(weights.layers):
        for name, shape in spec.tensor_shapes().items():
            expect(f"layer {index} {name}", layer.get(name), shape)


def model_config(spec: LlamaSpec) -> ml_collections.ConfigDict:
    """The HybridLM `model` section of `spec` (float32; pattern "A", one attention letter)."""
    cfg = get_default_config().model
    cfg.vocab_size, cfg.d_model, cfg.num_layers = spec.vocab_size, spec.d_model, spec.num_layers
    cfg.pattern, cfg.ffn, cfg.mlp_dim = "A", "swiglu", spec.mlp_dim
    cfg.tie_embeddings, cfg.norm_eps = spec.tie_embeddings, float(spec.norm_eps)
    cfg.mixers = {"A": mixer("attention", num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                             head_dim=spec.head_dim, rope_theta=float(spec.rope_theta),
                             qkv_bias=spec.qkv_bias, o_bias=spec.o_bias)}
    return cfg


def _dense(weight: np.ndarray, in_shape: tuple, out_shape: tuple, bias: np.ndarray | None = None) -> dict:
    """A Dense parameter dict from an HF `[out, in]` weight (and `[out]` bias)."""
    entry = {"kernel": weight.T.reshape(in_shape + out_shape).astype(np.float32)}
    if bias is not None:
        entry["bias"] = bias.reshape(out_shape).astype(np.float32)
    return entry


def layer_params(spec: LlamaSpec, layer: dict[str, np.ndarray]) -> dict:
    """One attention + SwiGLU block's HybridLM parameters from its HF-layout tensors."""
    d, h, kv, dh = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    mixer_params = {
        "q_proj": _dense(layer["q"], (d,), (h, dh), layer.get("q_bias")),
        "k_proj": _dense(layer["k"], (d,), (kv, dh), layer.get("k_bias")),
        "v_proj": _dense(layer["v"], (d,), (kv, dh), layer.get("v_bias")),
        "o_proj": _dense(layer["o"], (h, dh), (d,), layer.get("o_bias")),
    }
    return {
        "mixer_norm": {"scale": layer["attn_norm"].astype(np.float32)},
        "mixer": mixer_params,
        "ffn_norm": {"scale": layer["ffn_norm"].astype(np.float32)},
        "ffn": {"gate": _dense(layer["gate"], (d,), (spec.mlp_dim,)),
                "up": _dense(layer["up"], (d,), (spec.mlp_dim,)),
                "down": _dense(layer["down"], (spec.mlp_dim,), (d,))},
    }


def hybrid_params(spec: LlamaSpec, weights: LlamaWeights) -> dict:
    """The parameter tree (pure dict) of `model_config(spec)`'s HybridLM."""
    globals_ = {"embed": {"embedding": weights.embed.astype(np.float32)},
                "final_norm": {"scale": weights.final_norm.astype(np.float32)}}
    if not spec.tie_embeddings:
        globals_["lm_head"] = _dense(weights.lm_head, (spec.d_model,), (spec.vocab_size,))
    return join_layers(globals_, [layer_params(spec, layer) for layer in weights.layers], period=1)


def to_hybrid(checkpoint: LlamaCheckpoint) -> tuple[HybridLM, ml_collections.ConfigDict]:
    """(HybridLM holding the checkpoint's weights, its `model` config section)."""
    check_weights(checkpoint.spec, checkpoint.weights, checkpoint.source or "checkpoint")
    cfg = model_config(checkpoint.spec)
    return model_with_params(cfg, hybrid_params(checkpoint.spec, checkpoint.weights)), cfg
