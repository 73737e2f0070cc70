r"""Public entry of the Pallas kernels: `gated_recurrence` and `supports`.

Per (batch, head), q already scaled, state S in R^{K x V}, o_t = S_t^T q_t:

    beta given (delta):  S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T
    beta None:           S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T

with g `[.., K]` per channel, `[.., 1]` one scalar broadcast over K, or None (no decay). The call
cuts time into chunks (`chunk_math.to_chunks`: padding with identity steps, k = v = g = beta = 0),
flattens heads into the batch, and runs the `jax.custom_vjp` `recurrence.chunked_recurrence` on the
backend's state-pass kernels.

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

from pallas_kernels.chunk_math import KernelConfig, from_chunks, to_chunks
from pallas_kernels.recurrence import chunked_recurrence
from pallas_kernels.front_end import check_isolated, check_rank, check_shape, check_time, to_f32
# Both backends load with this module, which loads on the first kernel call (never with hybrid_jax):
# Pallas interpret mode imports the Mosaic TPU modules lazily, which registers a config option and so
# changes JAX's tracing context; importing both here, before any kernel is traced, keeps that change
# to one moment instead of one per backend.
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
    op = "gated_recurrence"
    check_rank(f"{op}: q", q, 4, "[B, T, H, K]")
    b, t, h, k_dim = q.shape
    check_shape(f"{op}: k", k, q.shape, "[B, T, H, K]")
    if v.ndim != 4 or tuple(v.shape[:3]) != (b, t, h):
        raise ValueError(f"{op}: v must have shape [B, T, H, V] with B, T, H = {(b, t, h)}, "
                         f"got {tuple(v.shape)}")
    v_dim = v.shape[3]
    if g is not None and tuple(g.shape) not in ((b, t, h, 1), (b, t, h, k_dim)):
        raise ValueError(f"{op}: g must have shape [B, T, H, K] = {(b, t, h, k_dim)} or [B, T, H, 1] = "
                         f"{(b, t, h, 1)} (or be None), got {tuple(g.shape)}")
    check_shape(f"{op}: beta", beta, (b, t, h), "[B, T, H]")
    check_shape(f"{op}: state", state, (b, h, k_dim, v_dim), "[B, H, K, V]")
    check_time(op, t, q=q, k=k, v=v)
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


def _kernel_chunks(x, chunk, d_pad=None):
    """`[B, T, H, D]` float32 -> `[B*H, N, C, D_pad]` (zeros appended along time and, if asked, D)."""
    x = to_chunks(to_f32(x), chunk)
    if d_pad is not None:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - x.shape[-1])])
    return x.reshape((-1,) + x.shape[2:])


def gated_recurrence(q, k, v, g, beta, state, *, chunk_size, backend=None, interpret=None, block_v=None,
                     isolated=None, resets=None, safe_gate=False, precision="highest"):
    """The gated (delta) recurrence on Pallas kernels.

    q, k `[B, T, H, K]` (heads expanded, q scaled), v `[B, T, H, V]`, g `[B, T, H, K or 1]` or None,
    beta `[B, T, H]` or None (None: the non-delta form), state `[B, H, K, V]`; computed in float32.
    backend: "gpu" | "tpu" | None (the platform of jax.devices()[0]); interpret: None runs interpret
    mode when that platform is not the backend's; block_v: V tile per program (see module docstring);
    isolated `[B, T, H]` bool or None: tokens that read and do not write, honoured by the chunk terms
    (`chunk_math.isolate`: identity steps for the state pass, their own reads on the diagonal), so the
    kernels themselves are unchanged. resets `[B, T, H]` bool or None: packed documents, the tokens
    before which the state restarts from zero (padding must already be identity steps, k = v = g =
    beta = 0), honoured by the chunk terms too (`chunk_math.document_runs`).
    safe_gate, precision: the terms' options (`chunk_math.chunk_terms`);
    the kernels' own matmuls follow `jax.default_matmul_precision`.
    Returns (o `[B, T, H, V]` float32, final state `[B, H, K, V]` float32); differentiable.
    """
    plan = _plan(q, k, v, g, beta, state, chunk_size, backend, interpret, block_v)
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    chunk = plan.config.chunk
    if g is None:
        g = jnp.zeros((b, t, h, 1), jnp.float32)
    per_channel = g.shape[-1] != 1
    inputs = (_kernel_chunks(q, chunk, plan.k_pad), _kernel_chunks(k, chunk, plan.k_pad),
              _kernel_chunks(v, chunk, plan.v_pad), _kernel_chunks(g, chunk, plan.k_pad if per_channel else None))
    isolated = check_isolated("gated_recurrence", isolated, (b, t, h), layout="[B, T, H]")
    resets = check_isolated("gated_recurrence", resets, (b, t, h), name="resets", layout="[B, T, H]")
    per_token = lambda x: None if x is None else _kernel_chunks(x[..., None], chunk)[..., 0]  # noqa: E731
    inputs += tuple(per_token(x) for x in (beta, isolated, resets))
    while inputs[-1] is None:  # the forms `chunk_math.chunk_terms` names: trailing Nones dropped
        inputs = inputs[:-1]
    s0 = jnp.pad(to_f32(state), [(0, 0), (0, 0), (0, plan.k_pad - k_dim), (0, plan.v_pad - v_dim)])
    config = plan.config._replace(safe_gate=safe_gate, precision=precision)
    o, final = chunked_recurrence(config, inputs, s0.reshape(b * h, plan.k_pad, plan.v_pad))
    o = from_chunks(o.reshape((b, h) + o.shape[1:]), t)[..., :v_dim]
    return o, final.reshape(b, h, plan.k_pad, plan.v_pad)[:, :, :k_dim, :v_dim]
