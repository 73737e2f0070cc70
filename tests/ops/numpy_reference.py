"""Independent float64 numpy recurrences, one token at a time, written from the math of
docs/conventions.md (never from the library's own step functions): the ground truth the `*_step`
ops and the `impl="reference"` forms are tested against.

Inputs are numpy-convertible arrays with a time axis (`[B, T, ...]`); each loop returns the outputs
of every token and the state after the last.
"""
from __future__ import annotations

import numpy as np


def _f64(x):
    return None if x is None else np.array(x, np.float64)  # a writable copy


def _grouped(x, heads, axis=2):
    """Grouped heads: head j of `heads` reads group j // (heads / G)."""
    return np.repeat(x, heads // x.shape[axis], axis=axis)


def _keep_if_isolated(isolated, t, carried, stepped):
    """The state passed on after token t: `carried` (the one before it) where the token is isolated
    (`isolated` `[B, T]` bool: it reads `stepped` but does not write), else `stepped`."""
    if isolated is None:
        return stepped
    mask = np.asarray(isolated)[:, t].reshape((-1,) + (1,) * (stepped.ndim - 1))
    return np.where(mask, carried, stepped)


def gated_loop(q, k, v, state, *, g=None, beta=None, scale=None, isolated=None):
    """S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T (beta None) or
    S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T (scale q_t).
    q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g `[B, T, HV]` / `[B, T, HV, K]` / None, beta `[B, T, HV]`.
    `isolated` `[B, T]` bool: those tokens output o_t but pass S_{t-1} on (read, do not write)."""
    q, k, v, s, g, beta = map(_f64, (q, k, v, state, g, beta))
    hv, k_dim = v.shape[2], q.shape[-1]
    q = _grouped(q, hv) * (k_dim**-0.5 if scale is None else scale)
    k = _grouped(k, hv)
    outs = []
    for t in range(q.shape[1]):
        carried = s
        if g is not None:
            decay = np.exp(g[:, t]) if g.ndim == 4 else np.exp(g[:, t])[..., None] * np.ones(k_dim)
            s = decay[..., :, None] * s
        if beta is None:
            write = v[:, t]
        else:
            recalled = np.einsum("bhk,bhkv->bhv", k[:, t], s)
            write = beta[:, t][..., None] * (v[:, t] - recalled)
        s = s + k[:, t][..., :, None] * write[..., None, :]
        outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s))
        s = _keep_if_isolated(isolated, t, carried, s)
    return np.stack(outs, 1), s


def selective_loop(u, dt, A, B, C, state, *, D=None, isolated=None):
    """h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]; y_t[d] = C_t . h_t[d] + D[d] u_t[d]."""
    u, dt, A, B, C, h, D = map(_f64, (u, dt, A, B, C, state, D))
    outs = []
    for t in range(u.shape[1]):
        stepped = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        y = np.einsum("bdn,bn->bd", stepped, C[:, t])
        outs.append(y if D is None else y + D * u[:, t])
        h = _keep_if_isolated(isolated, t, h, stepped)
    return np.stack(outs, 1), h


def ssd_loop(x, dt, A, B, C, state, *, D=None, isolated=None):
    """Per head h (group h // (H / G)): h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t^T; y_t = h_t^T C_t + D x_t."""
    x, dt, A, B, C, h, D = map(_f64, (x, dt, A, B, C, state, D))
    heads = x.shape[2]
    B, C = _grouped(B, heads), _grouped(C, heads)
    outs = []
    for t in range(x.shape[1]):
        stepped = (np.exp(A * dt[:, t])[..., None, None] * h
                   + dt[:, t, :, None, None] * B[:, t, :, :, None] * x[:, t, :, None, :])
        y = np.einsum("bhnp,bhn->bhp", stepped, C[:, t])
        outs.append(y if D is None else y + D[:, None] * x[:, t])
        h = _keep_if_isolated(isolated, t, h, stepped)
    return np.stack(outs, 1), h


def softmax_decode_loop(q, k, v, *, window=None, scale=None):
    """Token t attends to keys j <= t (and t - j < window): o_t = sum_j softmax_j(scale q_t . k_j) v_j.
    q `[B, T, H, K]`, k `[B, T, HKV, K]`, v `[B, T, HKV, V]`, query head h reads k/v head h // (H / HKV)."""
    q, k, v = map(_f64, (q, k, v))
    heads = q.shape[2]
    k, v = _grouped(k, heads), _grouped(v, heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for t in range(q.shape[1]):
        first = 0 if window is None else max(0, t - window + 1)
        logits = scale * np.einsum("bhk,bjhk->bhj", q[:, t], k[:, first:t + 1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        outs.append(np.einsum("bhj,bjhv->bhv", weights, v[:, first:t + 1]))
    return np.stack(outs, 1)


def log_linear_loop(q, k, v, levels, position, *, g, level_scales, beta=None, scale=None, isolated=None):
    """Fenwick levels, token by token from absolute position P: before token t > 0, levels 0 .. z
    (z = trailing one-bits of t - 1) merge into level z + 1; every level takes the token's transition;
    the token writes at level 0; o_t = sum_l lambda_t^l (S^(l))^T (scale q_t). An isolated token
    (`isolated` `[B, T]`) passes the merged levels on without its transition and write."""
    q, k, v, s, g, beta, lam = map(_f64, (q, k, v, levels, g, beta, level_scales))
    hv, k_dim = v.shape[2], q.shape[-1]
    q = _grouped(q, hv) * (k_dim**-0.5 if scale is None else scale)
    k = _grouped(k, hv)
    outs = []
    for j in range(q.shape[1]):
        t = position + j
        if t > 0:
            z = 0
            while (t - 1) >> z & 1:
                z += 1
            s[:, :, z + 1] += s[:, :, :z + 1].sum(axis=2)
            s[:, :, :z + 1] = 0.0
        carried = s.copy()
        decay = np.exp(g[:, j]) if g.ndim == 4 else np.exp(g[:, j])[..., None] * np.ones(k_dim)
        s = decay[:, :, None, :, None] * s
        kj = k[:, j][:, :, None]  # [B, HV, 1, K]: the same key for every level
        if beta is not None:  # every level loses b k (k^T S^(l)); only level 0 gains b k v^T
            recalled = np.einsum("bhlk,bhlkv->bhlv", np.broadcast_to(kj, s.shape[:4]), s)
            s = s - beta[:, j][:, :, None, None, None] * kj[..., None] * recalled[:, :, :, None, :]
        gain = 1.0 if beta is None else beta[:, j][..., None, None]
        s[:, :, 0] += gain * k[:, j][..., :, None] * v[:, j][..., None, :]
        outs.append(np.einsum("bhl,bhk,bhlkv->bhv", lam[:, j], q[:, j], s))
        s = _keep_if_isolated(isolated, j, carried, s)
    return np.stack(outs, 1), s


def rg_lru_loop(x, gate_x, gate_a, a_param, state, *, c=8.0, isolated=None):
    """RG-LRU per channel: a_t = sigmoid(-Lambda) ** (c r_t), y_t = h_t = a_t h_{t-1} + sqrt(1 - a_t^2)
    (i_t x_t). x, gate_x (i), gate_a (r) `[B, T, *C]`, a_param (Lambda) `C`, state `[B, *C]`;
    isolated tokens output h_t but pass h_{t-1} on."""
    x, i, r, lam, h = map(_f64, (x, gate_x, gate_a, a_param, state))
    base = 1.0 / (1.0 + np.exp(lam))
    outs = []
    for t in range(x.shape[1]):
        a = base ** (c * r[:, t])
        stepped = a * h + np.sqrt(1.0 - a**2) * i[:, t] * x[:, t]
        outs.append(stepped)
        h = _keep_if_isolated(isolated, t, h, stepped)
    return np.stack(outs, 1), h
