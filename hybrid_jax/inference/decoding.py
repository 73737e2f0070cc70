r"""Jitted prefill and decode steps over a split model, cache accounting, and the generation loop.

    decoder = Decoder(model)                                  # nnx.split once: graphdef + state
    logits, cache = decoder.prefill(tokens, max_len=256)      # jit per (prompt shape, max_len)
    logits, cache = decoder.decode_step(next_tokens, cache)   # one compiled program for every token

    tokens = generate(model, prompt, 200, temperature=0.8, top_k=40, seed=0)   # [B, 200]

The jitted functions take the model as `(graphdef, state)` (`jax.jit` over `nnx.split` state is
several times cheaper per call than graph-mode `nnx.jit`) and donate the cache, so each decode step
updates the KV caches and recurrent states in place instead of copying them. `generate` is a Python
loop over one jitted "decode + sample" step: shapes never change from token to token, so nothing
recompiles, and each token can be streamed as it is produced.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.inference.sampling import check_sampling, sample_logits
from hybrid_jax.models.hybrid_lm import DecodeCache, HybridLM


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array | None = None,
            *, max_len: int) -> tuple[jax.Array, DecodeCache]:
    """`HybridLM.prefill` of the model `graphdef` + `state`, jitted."""
    return nnx.merge(graphdef, state).prefill(tokens, max_len=max_len, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, state: nnx.State, next_tokens: jax.Array,
                cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """`HybridLM.decode_step`, jitted, with the cache donated (do not reuse the `cache` passed in).
    Rows past the cache's capacity get NaN logits (`HybridLM.decode_limit`)."""
    return nnx.merge(graphdef, state).decode_step(next_tokens, cache)


_SAMPLING = ("temperature", "top_k", "top_p", "vocab_limit")
sample = jax.jit(sample_logits, static_argnames=_SAMPLING)


@functools.partial(jax.jit, static_argnames=("graphdef", *_SAMPLING), donate_argnames=("cache",))
def decode_and_sample(graphdef, state, next_tokens, cache, key, **sampling):
    """Feeds `next_tokens` `[B]` and samples the token after them: (tokens `[B]`, cache)."""
    logits, cache = nnx.merge(graphdef, state).decode_step(next_tokens, cache)
    return sample_logits(logits, key, **sampling), cache


class Decoder:
    """A model split once into (graphdef, state), with jitted `prefill` and `decode_step`.

    `prefill` takes `max_len` as `HybridLM.prefill` does (required when a layer's cache is sized by
    it: global attention, MLA, log-linear). `decode_step` raises a ValueError instead of
    feeding a row whose position is past the cache's capacity (`HybridLM.decode_limit`), where the
    jitted step would return NaN logits; checking it reads the positions back from the device, so
    it waits for the previous step (whose logits a caller needs anyway to pick the next token).
    """

    def __init__(self, model: HybridLM):
        self.model = model  # for `decode_limit`, which reads only shapes and layer windows
        self.graphdef, self.state = nnx.split(model)

    def prefill(self, tokens, *, max_len: int | None = None, lengths=None) -> tuple[jax.Array, DecodeCache]:
        tokens = jnp.asarray(tokens, jnp.int32)
        lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        return prefill(self.graphdef, self.state, tokens, lengths, max_len=max_len)

    def decode_step(self, next_tokens, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        limit = self.model.decode_limit(cache)
        if limit is not None:
            last = int(np.max(np.asarray(cache.position)))
            if last >= limit:
                raise ValueError(
                    f"Decoder.decode_step: a row is at position {last}, past the {limit} positions the cache "
                    "holds (set by the prefill's max_len); its global attention / MLA (or log-linear) "
                    "layers would read tokens it no longer holds. Prefill with a larger max_len."
                )
        return decode_step(self.graphdef, self.state, jnp.asarray(next_tokens, jnp.int32), cache)


def cache_bytes(cache: DecodeCache) -> int:
    """Bytes of decode cache per sequence: the floating-point arrays of the cache (KV / latent caches
    and conv histories in the compute dtype, recurrent states in float32), positions excluded. With
    `model.dtype = "bfloat16"` this is the accounting of `hybrid_jax.inspect` / `Mixer.cache_bytes`."""
    batch = cache.position.shape[0]
    leaves = [leaf for leaf in jax.tree.leaves((cache.lead, cache.layers)) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    total = sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    return total // batch


def _prompt_batch(prompt_tokens, lengths) -> tuple[jax.Array, jax.Array | None]:
    tokens = np.asarray(prompt_tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"generate: prompt_tokens must be integers [T] or [B, T] with T >= 1, "
                         f"got {tokens.dtype}{list(tokens.shape)}")
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (tokens.shape[0],) or lengths.min() < 1 or lengths.max() > tokens.shape[1]:
            raise ValueError(f"generate: lengths must be [B] = [{tokens.shape[0]}] ints in [1, T={tokens.shape[1]}], "
                             f"got {lengths.tolist()}")
        lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.asarray(tokens, jnp.int32), lengths


def generate(
    model: HybridLM | Decoder,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
    lengths=None,
    max_len: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Samples `max_new_tokens` tokens after each prompt; returns them, int32 `[B, max_new_tokens]`.

    `prompt_tokens` `[T]` or `[B, T]` (right-padded, with `lengths` `[B]`, for prompts of different
    lengths). Token i is drawn with key `fold_in(PRNGKey(seed), i)`; `vocab_limit` bars ids >= it.
    `max_len` (default prompt + new tokens) sizes the caches; one too small for the prompt and the
    new tokens is a ValueError before anything runs. `on_token(tokens [B])` is called as each
    step's tokens arrive.
    """
    check_sampling(temperature, top_k, top_p, vocab_limit)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    tokens, lengths = _prompt_batch(prompt_tokens, lengths)
    needed = tokens.shape[1] + max_new_tokens - 1  # the last sampled token is never fed back
    max_len = tokens.shape[1] + max_new_tokens if max_len is None else max_len
    if max_len < needed:
        raise ValueError(f"generate: max_len={max_len} is too small for a {tokens.shape[1]}-token prompt and "
                         f"{max_new_tokens} new tokens (needs >= {needed})")
    logits, cache = decoder.prefill(tokens, max_len=max_len, lengths=lengths)
    last = tokens.shape[1] - 1 if lengths is None else lengths - 1
    last_logits = logits[jnp.arange(tokens.shape[0]), last]
    key = jax.random.PRNGKey(seed)
    options = dict(temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p),
                   vocab_limit=vocab_limit)
    step_tokens = sample(last_logits, jax.random.fold_in(key, 0), **options)
    produced = [step_tokens]
    if on_token is not None:
        on_token(np.asarray(step_tokens))
    for step in range(1, max_new_tokens):
        step_tokens, cache = decode_and_sample(decoder.graphdef, decoder.state, step_tokens, cache,
                                               jax.random.fold_in(key, step), **options)
        produced.append(step_tokens)
        if on_token is not None:
            on_token(np.asarray(step_tokens))
    return np.asarray(jnp.stack(produced, axis=1))


__all__ = ["Decoder", "cache_bytes", "decode_and_sample", "decode_step", "generate", "prefill", "sample"]
