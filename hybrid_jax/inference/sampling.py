r"""Next-token sampling from logits `[B, vocab]`: greedy, temperature, top-k, top-p (nucleus).

    temperature = 0:   t_b = argmax_v logits[b, v]                          (greedy; no randomness)
    otherwise:         z = logits / temperature
                       top-k:  keep the k largest z of each row (exactly k, ties broken by index)
                       top-p:  keep the smallest set of most likely tokens whose probability
                               softmax(z) sums to >= p (the most likely token always stays)
                       t_b ~ Categorical(softmax(z restricted to the kept tokens))

`vocab_limit=n` first removes ids >= n (a model vocabulary padded past its tokenizer's, e.g. 50304
for GPT-2's 50257, must never emit the padding ids). Both filters may be combined (top-k first,
then top-p over what is left, as in Hugging Face's `generate`). Sampling is a pure function of the
logits and a `jax.random` key, so the same key gives the same tokens; `generate` derives one key
per step with `jax.random.fold_in(key, step)`.
The options are Python values (static under `jax.jit`): changing them recompiles, tokens do not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.checks import is_int, is_number


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_limit: int | None = None) -> None:
    """ValueError naming the first bad option."""
    if not is_number(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if vocab_limit is not None and (not is_int(vocab_limit) or vocab_limit < 1):
        raise ValueError(f"vocab_limit must be None or an int >= 1, got {vocab_limit!r}")


def _token_mask(shape, tokens: jax.Array, keep: jax.Array | bool) -> jax.Array:
    """`shape` = [B, vocab] bool, True at tokens[b, i] where keep[b, i] (per-row token indices `[B, n]`)."""
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, bool).at[rows, tokens].set(keep)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """`[B, vocab]` bool: the k largest logits of each row (exactly k of them)."""
    _, tokens = jax.lax.top_k(logits, min(k, logits.shape[-1]))
    return _token_mask(logits.shape, tokens, True)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """`[B, vocab]` bool: the smallest most-likely set with probability >= p (masked logits = -inf)."""
    order = jnp.argsort(-logits, axis=-1)  # stable: ties keep index order
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    return _token_mask(logits.shape, order, mass_before < p) & jnp.isfinite(logits)


def sample_logits(
    logits: jax.Array, key: jax.Array | None, *, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, vocab_limit: int | None = None,
) -> jax.Array:
    """One token per row, int32 `[B]`, from logits `[B, vocab]` (see the module docstring)."""
    check_sampling(temperature, top_k, top_p, vocab_limit)
    if logits.ndim != 2:
        raise ValueError(f"sample_logits: logits must be [B, vocab], got shape {tuple(logits.shape)}")
    logits = logits.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample_logits: a jax.random key is required when temperature > 0")
    z = logits / temperature
    if top_k is not None:
        z = jnp.where(top_k_mask(z, top_k), z, -jnp.inf)
    if top_p is not None and top_p < 1:
        z = jnp.where(top_p_mask(z, top_p), z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


__all__ = ["check_sampling", "sample_logits", "top_k_mask", "top_p_mask"]
