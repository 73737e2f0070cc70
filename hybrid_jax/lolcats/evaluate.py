"""Held-out next-token loss, perplexity and decode memory of a model given as (config, parameters).

    nll = mean over held-out windows and positions of -log p(x_{t+1} | x_{<=t})     (nats / token)
    perplexity = exp(nll),    bits per byte = nll / ln 2 / (bytes / token of the held-out text)

The loss is `hybrid_jax.train.step.cross_entropy_loss`, the trainer's own, on the HybridLM built
from the config. Decode memory per sequence is `hybrid_jax.inspect`'s: the sum of every layer's
`Mixer.cache_bytes` at the context (KV caches grow with it, LoLCATs states and windows do not).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import build_model
from hybrid_jax.train.step import cross_entropy_loss


def next_token_batch(windows: np.ndarray) -> dict:
    """{"inputs", "targets"} of `[B, T + 1]` token windows."""
    windows = jnp.asarray(windows, jnp.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def heldout_nll(model_cfg, params: dict, windows: np.ndarray, *, batch_size: int = 2) -> float:
    """Mean next-token NLL (nats) of the model on `windows` `[N, T + 1]` (N a multiple of batch_size)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))[0]
    loss = jax.jit(lambda p, batch: cross_entropy_loss(graphdef, p, batch))
    params = jax.tree.map(jnp.asarray, params)
    losses = [float(loss(params, next_token_batch(windows[i:i + batch_size])))
              for i in range(0, len(windows), batch_size)]
    return float(np.mean(losses))


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 700.0))


def decode_bytes(model_cfg, context: int) -> int:
    """Decode cache per sequence at `context` tokens (bf16 caches, float32 recurrent states)."""
    return inspect_model(ml_collections.ConfigDict({"model": model_cfg.to_dict()}), context).total_cache_bytes
