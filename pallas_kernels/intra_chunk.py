r"""The two in-chunk computations of the chunked form that carry its numerics: the decayed products

    P[i, m] = sum_c x_i[c] y_m[c] exp(G_i[c] - G_m[c])   (m <= i, else 0)

(Tril(Aqk) and StrictLower(Akk); exact for any g <= 0, or as matmuls under the safe gate g >= -5),
and (I + L)^{-1} for the strictly lower L of the delta rule's WY transform. Both have hand-written
backward passes (`jax.custom_vjp`). The algebra around them is in `chunk_math`; the derivations in the
repository's docs/chunked_algorithms.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.precision import dot, matmul, transposed_copy

SUB_CHUNK = 16  # sub-chunk length for per-channel decays
MIN_LOWER_BOUND = -5.0  # the safe gate's bound: a sub-chunk factor then stays within exp(8 * 5)


def sub_chunk_length(chunk: int) -> int:
    """The sub-chunk length a per-channel decay uses inside a chunk of `chunk` positions."""
    return math.gcd(chunk, SUB_CHUNK)


def decayed_products(xs: tuple[jax.Array, ...], y: jax.Array, G: jax.Array, *, safe_gate: bool = False,
                     precision: str = "highest") -> tuple[jax.Array, ...]:
    """For each x in `xs`: P[..., i, m] = sum_c x_i[c] y_m[c] exp(G_i[c] - G_m[c]) for m <= i, else 0.

    x, y `[..., C, K]`; G `[..., C, K]` (per channel) or `[..., C, 1]` (scalar), non-increasing along C.
    The decay factors depend only on G, so Aqk and Akk share them (the exps dominate the cost).
    `safe_gate` (per channel only): every step's g >= MIN_LOWER_BOUND, see `_bounded_products`.
    """
    c = y.shape[-2]
    if G.shape[-1] == 1:  # scalar decay: one matmul times the masked relative decay
        return _scalar_products(xs, y, G, precision)
    if safe_gate:
        return _bounded_products(xs, y, G, precision)
    s = sub_chunk_length(c)
    n_sub = c // s
    lead = y.shape[:-2]
    split = lambda a: a.reshape(lead + (n_sub, s, a.shape[-1]))  # noqa: E731
    ys, Gs = split(y), split(G)
    G_ref = Gs[..., :, :1, :]  # [.., n_sub, 1, K]: first position r of each query sub-chunk
    # Off-diagonal: keys m < r, through the reference position (mask before the exp).
    key_before_ref = jnp.arange(c)[None, :] < (jnp.arange(n_sub) * s)[:, None]  # [n_sub, C]
    y_to_ref = y[..., None, :, :] * jnp.exp(
        jnp.where(key_before_ref[..., None], G_ref - G[..., None, :, :], -jnp.inf))
    from_ref = jnp.exp(Gs - G_ref)
    # Diagonal blocks: explicit s x s x K products.
    in_block = jnp.tril(jnp.ones((s, s), bool))[..., None]
    y_rel = ys[..., None, :, :] * jnp.exp(
        jnp.where(in_block, Gs[..., :, None, :] - Gs[..., None, :, :], -jnp.inf))
    block_eye = jnp.eye(n_sub, dtype=y.dtype)[:, None, :, None]
    products = []
    for x in xs:
        x_sub = split(x)
        off = dot("...aik,...amk->...aim", x_sub * from_ref, y_to_ref, precision)
        diag = jnp.einsum("...aik,...aimk->...aim", x_sub, y_rel)
        full = off.reshape(lead + (n_sub, s, n_sub, s)) + diag[..., :, :, None, :] * block_eye
        products.append(full.reshape(lead + (c, c)))
    return tuple(products)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scalar_products(xs, y, G, precision):
    """`decayed_products` for a scalar decay G `[.., C, 1]`: (x y^T) * exp(G_i - G_m), masked."""
    return _scalar_products_fwd(xs, y, G, precision)[0]


def _scalar_products_fwd(xs, y, G, precision):
    c = y.shape[-2]
    causal = jnp.tril(jnp.ones((c, c), bool))
    decay = jnp.exp(jnp.where(causal, G[..., :, None, 0] - G[..., None, :, 0], -jnp.inf))
    products = tuple(matmul(x, jnp.swapaxes(y, -1, -2), precision) * decay for x in xs)
    return products, (xs, y, decay, products)


def _scalar_products_bwd(precision, residuals, d_products):
    # The key-side cotangent sum_p (dP_p * decay)^T x_p is one matmul over the products stacked along
    # its contraction, its left operand an explicit transposed copy (`transposed_copy`).
    # With P = S * decay, decay = exp(G_i - G_m): dG_i = sum_m dP P [i, m] - sum_m dP P [m, i].
    xs, y, decay, products = residuals
    d_scaled = [d * decay for d in d_products]
    d_xs = tuple(matmul(d, y, precision) for d in d_scaled)
    d_y = matmul(transposed_copy(*d_scaled), jnp.concatenate(xs, axis=-2), precision)
    e = sum(d * p for d, p in zip(d_products, products))
    return d_xs, d_y, (jnp.sum(e, axis=-1) - jnp.sum(e, axis=-2))[..., None]


_scalar_products.defvjp(_scalar_products_fwd, _scalar_products_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bounded_products(xs, y, G, precision):
    """`decayed_products` for per-channel decays with every step's g >= MIN_LOWER_BOUND (the safe gate).

    Each sub-chunk a of s positions gets a reference position r_a in its middle, and for every key m
    up to the end of a, exp(G_i - G_m) = exp(G_i - G_{r_a}) exp(G_{r_a} - G_m): query sub-chunk a
    against all its keys is one `[s, K] x [K, C]` matmul. With |g| <= 5 the query factor is at most
    exp(5 s / 2) = exp(40) (s = 16) and the key factor at most exp(35) (keys after r_a in a; earlier
    keys get factors <= 1), so every product, the masked ones (m > i inside a) included, stays finite
    in float32, and the diagonal blocks are matmuls instead of s x s x K products of exponentials."""
    return _bounded_products_and_factors(xs, y, G, precision)[0]


def _bounded_products_and_factors(xs, y, G, precision):
    """(the products, (x * exp(G - G_r) for x in xs, y * exp(G_r - G), exp(G - G_r), exp(G_r - G)))."""
    c = y.shape[-2]
    to_ref, from_ref = _bounded_factors(G)
    y_from_ref = y[..., None, :, :] * from_ref
    xs_to_ref = tuple(x.reshape(to_ref.shape) * to_ref for x in xs)
    causal = jnp.tril(jnp.ones((c, c), bool))
    products = tuple(jnp.where(causal, dot("...aik,...amk->...aim", x_to_ref, y_from_ref, precision)
                               .reshape(x.shape[:-2] + (c, c)), 0.0) for x, x_to_ref in zip(xs, xs_to_ref))
    return products, (xs_to_ref, y_from_ref, to_ref, from_ref)


def _bounded_factors(G):
    """(exp(G - G_r) `[.., n_sub, s, K]` of the queries, exp(G_r - G) `[.., n_sub, C, K]` of the keys,
    zero after the end of each query sub-chunk)."""
    c = G.shape[-2]
    s = sub_chunk_length(c)
    n_sub = c // s
    refs = jnp.arange(n_sub) * s + s // 2
    G_ref = G[..., refs, None, :]  # [.., n_sub, 1, K]
    # Masked before the exp: a key after the sub-chunk could overflow its factor.
    upto_end = (jnp.arange(c)[None, :] < (jnp.arange(1, n_sub + 1) * s)[:, None])[..., None]  # [n_sub, C, 1]
    from_ref = jnp.exp(jnp.where(upto_end, G_ref - G[..., None, :, :], -jnp.inf))
    to_ref = jnp.exp(G.reshape(G.shape[:-2] + (n_sub, s, G.shape[-1])) - G_ref)
    return to_ref, from_ref


def _bounded_products_fwd(xs, y, G, precision):
    # The factors are kept: this runs inside the recomputing backwards (the chunked recurrence's
    # custom VJP, a checkpointed block), one block at a time, so they cost cache, not memory, and
    # forming their exponentials again took ~2 ms of safe-gate KDA's ~66 ms at T = 4096.
    products, factors = _bounded_products_and_factors(xs, y, G, precision)
    return products, (xs, y, factors)


def _bounded_products_bwd(precision, residuals, d_products):
    # Reverse mode written out, the factors kept from the forward: one matmul per cotangent, the key-side
    # cotangents of all products in one matmul (its left operand an explicit transposed copy, as in
    # `_scalar_products_bwd`), and the G terms from [C, K] products (x * dx, y * dy),
    # where autodiff re-broadcast the [n_sub, C, K] factor tensors several times. The reference
    # positions get no G term: every unmasked product is sum_c x_i y_m exp(G_i - G_m), whatever r_a,
    # so the two terms through r_a cancel exactly (autodiff formed both, and a [n_sub, C, K] reduction).
    xs, y, (xs_to_ref, y_from_ref, to_ref, from_ref) = residuals
    c, lead = y.shape[-2], y.shape[:-2]
    n_sub, s = to_ref.shape[-3:-1]
    causal = jnp.tril(jnp.ones((c, c), bool))
    d_ps = [jnp.where(causal, d, 0.0).reshape(lead + (n_sub, s, c)) for d in d_products]
    d_xs = tuple((dot("...aim,...amk->...aik", d_p, y_from_ref, precision) * to_ref).reshape(x.shape)
                 for d_p, x in zip(d_ps, xs))
    x_to_ref = jnp.concatenate(xs_to_ref, axis=-2)
    d_y_from_ref = dot("...ami,...aik->...amk", transposed_copy(*d_ps), x_to_ref, precision)
    d_y = jnp.sum(d_y_from_ref * from_ref, axis=-3)
    # d/dG_i: the query factor of row i grows with G_i, the key factor of column i shrinks with it.
    return d_xs, d_y, sum(d_x * x for d_x, x in zip(d_xs, xs)) - d_y * y


_bounded_products.defvjp(_bounded_products_fwd, _bounded_products_bwd)


@jax.custom_vjp
def invert_unit_lower(strict_lower: jax.Array) -> jax.Array:
    """(I + L)^{-1} for strictly lower triangular L `[.., C, C]`, exactly and in float32 matmuls: the
    inverses of the diagonal blocks double in size each round, 1, 2, 4, ..., C (L padded to a power
    of two with zeros, which extends I + L by an identity block), through

        [[A, 0], [B, D]]^{-1} = [[A^{-1}, 0], [-D^{-1} B A^{-1}, D^{-1}]].

    This is the recursive form of forward substitution (the same rounding behaviour, no power series
    whose terms could cancel), but as O(log C) rounds of batched matmuls, O(C^3 / 3) work in all,
    where XLA:CPU's batched triangular solve runs one small solve at a time (50x slower here)."""
    c = strict_lower.shape[-1]
    size = 1 << (c - 1).bit_length()
    lead = strict_lower.shape[:-2]
    lower = jnp.pad(strict_lower, [(0, 0)] * len(lead) + [(0, size - c)] * 2)
    inverse = jnp.ones(lead + (size, 1, 1), strict_lower.dtype)  # the 1 x 1 diagonal blocks of I + L
    n = 1
    while n < size:
        pairs = size // (2 * n)
        blocks = lower.reshape(lead + (pairs, 2 * n, pairs, 2 * n))
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [.., pairs, 2n, 2n]
        below = blocks[..., n:, :n]  # B of each pair
        halves = inverse.reshape(lead + (pairs, 2, n, n))
        a_inv, d_inv = halves[..., 0, :, :], halves[..., 1, :, :]
        corner = -matmul(d_inv, matmul(below, a_inv))
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        inverse = jnp.concatenate([top, jnp.concatenate([corner, d_inv], axis=-1)], axis=-2)
        n *= 2
    return inverse[..., 0, :c, :c]


def _invert_unit_lower_fwd(strict_lower):
    inverse = invert_unit_lower(strict_lower)
    return inverse, inverse


def _invert_unit_lower_bwd(inverse, d_inverse):
    return (inverse_cotangent(transposed_copy(inverse), d_inverse),)


def inverse_cotangent(inverse_t: jax.Array, d_inverse: jax.Array) -> jax.Array:
    """The cotangent of L from that of X = (I + L)^{-1}, given X^T (`transposed_copy`): dX = -X dL X, so
    dL = -X^T dX X^T on L's strictly lower support (two matmuls, where autodiff would retrace every
    doubling round of `invert_unit_lower` through its concatenations)."""
    return jnp.tril(-matmul(inverse_t, matmul(d_inverse, inverse_t)), -1)


invert_unit_lower.defvjp(_invert_unit_lower_fwd, _invert_unit_lower_bwd)
