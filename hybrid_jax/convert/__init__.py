"""Pretrained Llama-family weights into HybridLM: GGUF files and Hugging Face safetensors folders.

    checkpoint = read_gguf(smollm2_path())        # or read_hf("path/to/folder")
    model, model_cfg = to_hybrid(checkpoint)      # HybridLM + its `model` config section
    checkpoint.tokenizer                          # GGUF metadata's BPE / HF tokenizer.json (or None)

See `hybrid_jax.convert.llama` for the mapping, `.gguf` / `.hf` for the readers.
"""
from hybrid_jax.convert.gguf import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TYPES,
    read_gguf,
    read_gguf_tokenizer,
    smollm2_path,
)
from hybrid_jax.convert.hf import SUPPORTED_MODEL_TYPES, read_hf, read_hf_tokenizer
from hybrid_jax.convert.llama import LlamaCheckpoint, LlamaSpec, LlamaWeights, model_config, to_hybrid

__all__ = ["LlamaCheckpoint", "LlamaSpec", "LlamaWeights", "SUPPORTED_ARCHITECTURES", "SUPPORTED_MODEL_TYPES",
           "SUPPORTED_TYPES", "model_config", "read_gguf", "read_gguf_tokenizer", "read_hf", "read_hf_tokenizer",
           "smollm2_path", "to_hybrid"]
