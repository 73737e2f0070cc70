"""Inference: prefill + per-token decoding with each mixer's cache, sampling, checkpoint loading.

    from hybrid_jax.inference import Decoder, generate, load_model
    model, config, step = load_model("runs/x")                 # newest checkpoint of a training run
    tokens = generate(model, prompt_ids, 200, temperature=0.8, top_k=40, seed=0)

    decoder = Decoder(model)                                   # jitted steps over nnx.split state
    logits, cache = decoder.prefill(tokens, max_len=1024)      # [B, T, vocab], DecodeCache
    logits, cache = decoder.decode_step(next_tokens, cache)    # [B, vocab]; the cache is donated

The caches themselves are built by the model (`HybridLM.prefill` / `decode_step`) and its mixers
(`KVCache`, `LatentCache`, `RecurrentCache` with a `FenwickState` for log-linear layers).
"""
from hybrid_jax.inference.checkpoint import load_model, load_run_config
from hybrid_jax.inference.decoding import Decoder, cache_bytes, decode_and_sample, decode_step, generate, prefill
from hybrid_jax.inference.sampling import check_sampling, sample_logits, top_k_mask, top_p_mask
from hybrid_jax.models.hybrid_lm import DecodeCache

__all__ = [
    "DecodeCache",
    "Decoder",
    "cache_bytes",
    "check_sampling",
    "decode_and_sample",
    "decode_step",
    "generate",
    "load_model",
    "load_run_config",
    "prefill",
    "sample_logits",
    "top_k_mask",
    "top_p_mask",
]
