r"""Mixture-of-experts routing and dispatch: pure functions of arrays (no parameters, no config).

Tokens are flattened to `x [N, d]`; expert e is a SwiGLU with kernels `w_gate[e], w_up[e] [d, h]`,
`w_down[e] [h, d]`:  `FFN_e(x) = (SiLU(x W_gate_e) * (x W_up_e)) W_down_e`.

Routing (`route`), from router logits `z = x W_r [N, E]` (float32):

    softmax router (Mixtral):     s = softmax(z)
    sigmoid router (DeepSeek-V3): s = sigmoid(z)
    chosen experts   I_n = top-k_e (s_{n,e} + b_e)     b: the balancing bias, for the choice only
    weights          w_{n,i} = s_{n,I_n,i}  (/ sum_i s_{n,I_n,i} when normalised) * routed_scale

Every dispatch computes y_n = sum_i w_{n,i} FFN_{I_n,i}(x_n):

* `dense_reference`: every expert on every token, `y = sum_e c_{n,e} FFN_e(x_n)` with the combine
  matrix `c_{n,e}` = the weight of e for token n (0 when e is not chosen). The ground truth.
* `dropless`: the N k (token, expert) assignments sorted by expert, one grouped matmul per kernel
  (`jax.lax.ragged_dot` with the experts' group sizes), weighted outputs scatter-added back.
* `capacity`: static shapes. Expert e takes at most C = ceil(capacity_factor N k / E) assignments,
  in priority order: every token's first choice (tokens in order), then every token's second
  choice, and so on (GShard / Switch). An assignment past its expert's C is dropped: it adds
  nothing, so the token keeps only the residual (and its other experts). Buffers `[E, C, d]`.

Statistics (`routing_stats`), with f_e = the fraction of the N k assignments sent to expert e and
P_e = the mean over tokens of the router distribution p (softmax: s; sigmoid: s / sum_e s):

    load-balancing loss  E sum_e f_e P_e        (Switch / GShard; 1 when perfectly balanced)
    router z-loss        mean_n logsumexp(z_n)^2 (ST-MoE)
    max / mean load      max_e f_e / (1 / E)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity", "dense")


class Routing(NamedTuple):
    experts: jax.Array  # [N, k] int32, chosen experts, best first
    weights: jax.Array  # [N, k] float32 combine weights
    probs: jax.Array  # [N, E] float32 router distribution (rows sum to 1), for the balancing loss
    logits: jax.Array  # [N, E] float32 router logits, for the z-loss


class ExpertKernels(NamedTuple):
    gate: jax.Array  # [E, d, h]
    up: jax.Array  # [E, d, h]
    down: jax.Array  # [E, h, d]


def route(logits: jax.Array, *, k: int, router: str, normalize: bool, scale: float = 1.0,
          bias: jax.Array | None = None) -> Routing:
    """Top-k routing of `logits [N, E]` (see the module docstring); `bias [E]` shifts the choice only."""
    logits = logits.astype(jnp.float32)
    if router == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    elif router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"router: {router!r} is not valid; valid values are {list(ROUTERS)}")
    # The bias steers which experts are chosen, never how much they weigh, and is never trained by
    # the gradient (it is updated from the loads, outside the loss).
    selection = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    _, experts = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights * scale, probs, logits)


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
    """f_e: the fraction of all assignments `experts [N, k]` that go to each expert, `[E]`."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
    return counts / experts.size


def routing_stats(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """load `[E]`, the load-balancing loss and the router z-loss (module docstring)."""
    load = expert_load(routing.experts, num_experts)
    balance = num_experts * jnp.sum(load * jnp.mean(routing.probs, axis=0))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1)))
    return {"load": load, "aux_loss": balance, "z_loss": z_loss}


def _swiglu(h_gate: jax.Array, h_up: jax.Array) -> jax.Array:
    return jax.nn.silu(h_gate) * h_up


def dense_reference(x: jax.Array, routing: Routing, kernels: ExpertKernels) -> jax.Array:
    """Every expert on every token, masked by the combine matrix: `[N, d]`."""
    n, num_experts = x.shape[0], kernels.gate.shape[0]
    combine = jnp.zeros((n, num_experts), jnp.float32)
    combine = combine.at[jnp.arange(n)[:, None], routing.experts].add(routing.weights)
    hidden = _swiglu(jnp.einsum("nd,edh->neh", x, kernels.gate), jnp.einsum("nd,edh->neh", x, kernels.up))
    outputs = jnp.einsum("neh,ehd->ned", hidden, kernels.down)
    return jnp.einsum("ne,ned->nd", combine.astype(x.dtype), outputs)


def dropless(x: jax.Array, routing: Routing, kernels: ExpertKernels) -> jax.Array:
    """Sorted by expert, grouped matmuls (`ragged_dot`), scattered back: `[N, d]`."""
    n, k = routing.experts.shape
    num_experts = kernels.gate.shape[0]
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    tokens = order // k
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_experts].add(1)
    xs = x[tokens]
    hidden = _swiglu(jax.lax.ragged_dot(xs, kernels.gate, group_sizes),
                     jax.lax.ragged_dot(xs, kernels.up, group_sizes))
    ys = jax.lax.ragged_dot(hidden, kernels.down, group_sizes)
    ys = ys * routing.weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[tokens].add(ys)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor N k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_slots(experts: jax.Array, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(slot, kept) of every assignment in priority order (choice rank major, then token), `[k N]`.

    slot = e C + (the assignment's position among those of expert e); dropped ones get the dump
    slot E C."""
    flat = experts.T.reshape(-1)  # rank-major: all first choices come before any second choice
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    position = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    kept = position < capacity
    return jnp.where(kept, flat * capacity + position, num_experts * capacity), kept


def capacity(x: jax.Array, routing: Routing, kernels: ExpertKernels, *,
             capacity_factor: float) -> tuple[jax.Array, jax.Array]:
    """(`[N, d]`, dropped fraction of the assignments) with static `[E, C, d]` expert buffers."""
    n, k = routing.experts.shape
    num_experts = kernels.gate.shape[0]
    cap = expert_capacity(n, k, num_experts, capacity_factor)
    slots, kept = capacity_slots(routing.experts, num_experts, cap)
    tokens = jnp.tile(jnp.arange(n), k)
    # One spare row takes every dropped assignment; it is computed and thrown away.
    buffers = jnp.zeros((num_experts * cap + 1, x.shape[1]), x.dtype).at[slots].add(x[tokens])
    buffers = buffers[:-1].reshape(num_experts, cap, x.shape[1])
    hidden = _swiglu(jnp.einsum("ecd,edh->ech", buffers, kernels.gate),
                     jnp.einsum("ecd,edh->ech", buffers, kernels.up))
    outputs = jnp.einsum("ech,ehd->ecd", hidden, kernels.down).reshape(num_experts * cap, -1)
    outputs = jnp.concatenate([outputs, jnp.zeros_like(outputs[:1])])
    weights = jnp.where(kept, routing.weights.T.reshape(-1), 0.0).astype(x.dtype)
    y = jnp.zeros_like(x).at[tokens].add(outputs[slots] * weights[:, None])
    return y, 1.0 - jnp.mean(kept.astype(jnp.float32))


__all__ = [
    "DISPATCHES",
    "ROUTERS",
    "ExpertKernels",
    "Routing",
    "capacity",
    "capacity_slots",
    "dense_reference",
    "dropless",
    "expert_capacity",
    "expert_load",
    "route",
    "routing_stats",
]
