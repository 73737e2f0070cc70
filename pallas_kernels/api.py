r"""Public entry of the Pallas kernels: `gated_recurrence` and `supports`.

Per (batch, head), q already scaled, state S in R^{K x V}, o_t = S_t^T q_t:

    beta given (delta):  S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T
    beta None:           S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T

with g `[.., K]` per channel, `[.., 1]` one scalar broadcast over K, or None (no decay). The call
flattens heads into the batch, pads time to whole chunks with identity steps (k = v = g = beta = 0),
and runs one family's `jax.custom_vjp` (`pallas_kernels.delta` / `pallas_kernels.gla`) on the backend's
state-pass kernels.

Backends: "gpu" (Pallas Triton) and "tpu" (Mosaic TPU); the default follows jax.devices()[0]. When
the default device is not the backend's platform (e.g. CPU), the kernels run in Pallas interpret mode
(`interpret=True` for GPU, `pltpu.InterpretParams()` for TPU semantics). Limits (`supports` reports
them, `gated_recurrence` raises ValueError naming them):

* gpu: chunk_size a power of two in [16, 128]; K, V multiples of 16 (padded with zeros to the next
  power of two, exact: zero channels stay zero), K <= 256; block_v a power of two >= 16 dividing the
  padded V (default min(V, 32)).
* tpu: chunk_size a multiple of 8 in [8, 512]; K a multiple of 8; V a multiple of 8 when V <= 128,
  else a multiple of 128 (block_v: V when V <= 128, else a multiple of 128 dividing V, default 128).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_math import KernelConfig
from pallas_kernels.delta import delta_recurrence
from pallas_kernels.gla import gla_recurrence
# Both backends load with the package, not on first use: Pallas interpret mode imports the Mosaic TPU
# modules lazily, which registers a config option and so changes JAX's tracing context; every jitted
# caller would then retrace (and recompile) once on its second call.
from pallas_kernels.gpu import state_pass as _gpu_state_pass  # noqa: F401
from pallas_kernels.tpu import state_pass as _tpu_state_pass  # noqa: F401

BACKENDS = ("gpu", "tpu")
GPU_MAX_K = 256


class _Plan(NamedTuple):
    config: KernelConfig
    k_pad: int  # K after padding (GPU: next power of two)
    v_pad: int


def _default_platform() -> str:
    return jax.devices()[0].platform


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _check_shapes(q, k, v, g, beta, state):
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {tuple(q.shape)}")
    b, t, h, k_dim = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have shape [B, T, H, K] = {tuple(q.shape)} (same as q), got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (b, t, h):
        raise ValueError(f"v must have shape [B, T, H, V] with B, T, H = {(b, t, h)}, got {tuple(v.shape)}")
    v_dim = v.shape[3]
    if g is not None and tuple(g.shape) not in ((b, t, h, 1), (b, t, h, k_dim)):
        raise ValueError(f"g must have shape [B, T, H, K] = {(b, t, h, k_dim)} or [B, T, H, 1] = "
                         f"{(b, t, h, 1)} (or be None), got {tuple(g.shape)}")
    if beta is not None and tuple(beta.shape) != (b, t, h):
        raise ValueError(f"beta must have shape [B, T, H] = {(b, t, h)} (or be None), got {tuple(beta.shape)}")
    if tuple(state.shape) != (b, h, k_dim, v_dim):
        raise ValueError(f"state must have shape [B, H, K, V] = {(b, h, k_dim, v_dim)}, got {tuple(state.shape)}")
    if t < 1:
        raise ValueError(f"q must have at least one time step, got T={t}")
    return k_dim, v_dim


def _resolve_backend(backend, interpret):
    platform = _default_platform()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {backend!r}")
    if interpret is None:
        interpret = platform != backend
    elif not interpret and platform != backend:
        raise ValueError(f"backend={backend!r} compiles for a {backend.upper()} but the default device is "
                         f"{platform!r}; pass interpret=True (or None) to run it in interpret mode")
    return backend, bool(interpret)


def _plan_gpu(chunk_size, k_dim, v_dim, block_v):
    if not (_is_pow2(chunk_size) and 16 <= chunk_size <= 128):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two in [16, 128] for the GPU kernel "
                         "(Triton tensors have power-of-two sizes and tl.dot needs dims >= 16)")
    for name, dim in (("K", k_dim), ("V", v_dim)):
        if dim % 16:
            raise ValueError(f"head dim {name}={dim} must be a multiple of 16 for the GPU kernel")
    if k_dim > GPU_MAX_K:
        raise ValueError(f"head dim K={k_dim} must be <= {GPU_MAX_K} for the GPU kernel "
                         "(the K x block_v state tile lives in registers)")
    k_pad, v_pad = _next_pow2(k_dim), _next_pow2(v_dim)
    block_v = min(v_pad, 32) if block_v is None else block_v
    if not (_is_pow2(block_v) and 16 <= block_v and v_pad % block_v == 0):
        raise ValueError(f"block_v={block_v} must be a power of two >= 16 dividing V={v_pad} "
                         "(padded to a power of two) for the GPU kernel")
    return k_pad, v_pad, block_v


def _plan_tpu(chunk_size, k_dim, v_dim, block_v):
    if chunk_size % 8 or not 8 <= chunk_size <= 512:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of 8 in [8, 512] for the TPU kernel "
                         "(chunk rows are the sublane dim of its (C, K) blocks)")
    if k_dim % 8:
        raise ValueError(f"head dim K={k_dim} must be a multiple of 8 for the TPU kernel "
                         "(K is the sublane dim of the (K, block_v) state blocks)")
    if v_dim > 128 and v_dim % 128:
        raise ValueError(f"head dim V={v_dim} must be a multiple of 128 when V > 128 for the TPU kernel "
                         "(V tiles are lane-dim blocks)")
    if v_dim % 8:
        raise ValueError(f"head dim V={v_dim} must be a multiple of 8 for the TPU kernel")
    block_v = min(v_dim, 128) if block_v is None else block_v
    if block_v != v_dim and (block_v % 128 or v_dim % block_v):
        raise ValueError(f"block_v={block_v} must be V={v_dim} or a multiple of 128 dividing V for the TPU kernel")
    return k_dim, v_dim, block_v


def _plan(q, k, v, g, beta, state, chunk_size, backend, interpret, block_v) -> _Plan:
    k_dim, v_dim = _check_shapes(q, k, v, g, beta, state)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be an int, got {chunk_size!r}")
    backend, interpret = _resolve_backend(backend, interpret)
    plan_for = _plan_gpu if backend == "gpu" else _plan_tpu
    k_pad, v_pad, block_v = plan_for(chunk_size, k_dim, v_dim, block_v)
    return _Plan(KernelConfig(chunk_size, backend, interpret, block_v), k_pad, v_pad)


def supports(q, k, v, g, beta, state, *, chunk_size, backend=None, interpret=None, block_v=None):
    """(True, "") if `gated_recurrence` runs these shapes on this backend, else (False, reason).

    Arguments as for `gated_recurrence`; only shapes are read (jax.ShapeDtypeStruct works).
    """
    try:
        _plan(q, k, v, g, beta, state, chunk_size, backend, interpret, block_v)
    except ValueError as err:
        return False, str(err)
    return True, ""


def _heads_major(x, t_pad, d_pad=None):
    """`[B, T, H, D]` -> `[B*H, T_pad, D_pad]` (zeros appended along time and, if asked, D)."""
    b, t, h = x.shape[:3]
    x = jnp.swapaxes(x, 1, 2).reshape((b * h, t) + x.shape[3:])
    widths = [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2)
    if d_pad is not None:
        widths[-1] = (0, d_pad - x.shape[-1])
    return jnp.pad(x, widths)


def gated_recurrence(q, k, v, g, beta, state, *, chunk_size, backend=None, interpret=None, block_v=None):
    """The gated (delta) recurrence on Pallas kernels.

    q, k `[B, T, H, K]` (heads expanded, q scaled), v `[B, T, H, V]`, g `[B, T, H, K or 1]` or None,
    beta `[B, T, H]` or None (None: the non-delta form), state `[B, H, K, V]`; computed in float32.
    backend: "gpu" | "tpu" | None (the platform of jax.devices()[0]); interpret: None runs interpret
    mode when that platform is not the backend's; block_v: V tile per program (see module docstring).
    Returns (o `[B, T, H, V]` float32, final state `[B, H, K, V]` float32); differentiable.
    """
    plan = _plan(q, k, v, g, beta, state, chunk_size, backend, interpret, block_v)
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    chunk = plan.config.chunk
    t_pad = -(-t // chunk) * chunk
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    if g is None:
        g = jnp.zeros((b, t, h, 1), jnp.float32)
    per_channel = g.shape[-1] != 1
    inputs = [_heads_major(f32(q), t_pad, plan.k_pad), _heads_major(f32(k), t_pad, plan.k_pad),
              _heads_major(f32(v), t_pad, plan.v_pad),
              _heads_major(f32(g), t_pad, plan.k_pad if per_channel else None)]
    s0 = jnp.pad(f32(state), [(0, 0), (0, 0), (0, plan.k_pad - k_dim), (0, plan.v_pad - v_dim)])
    s0 = s0.reshape(b * h, plan.k_pad, plan.v_pad)
    if beta is None:
        o, final = gla_recurrence(plan.config, tuple(inputs), s0)
    else:
        inputs.append(_heads_major(f32(beta)[..., None], t_pad)[..., 0])
        o, final = delta_recurrence(plan.config, tuple(inputs), s0)
    o = jnp.swapaxes(o[:, :t, :v_dim].reshape(b, h, t, v_dim), 1, 2)
    return o, final.reshape(b, h, plan.k_pad, plan.v_pad)[:, :, :k_dim, :v_dim]
