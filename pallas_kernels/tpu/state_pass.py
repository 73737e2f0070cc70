r"""Pallas Mosaic TPU kernels for the sequential pass over chunks.

Same math and interface as `pallas_kernels.gpu.state_pass` (read its docstring): per (head, V tile),
`forward_pass` (outputs or, with emit_states=True, the entering states)
    U = Ubar_c - W_c S  (non-delta: Ubar_c),  [O_c = Qg_c S + A_c U],  S <- Diag(Gam_C,c) S + Kt_c^T U
and `backward`, from the last chunk to the first,
    dU = A_c^T dO_c + Kt_c dS,   dS <- Qg_c^T dO_c + Diag(Gam_C,c) dS - W_c^T dU.
The TPU shape of it: the chunk index is the last grid axis, marked "arbitrary" (sequential on one
core), so Pallas double-buffers the next chunk's terms HBM -> VMEM while the current one computes,
and the state tile S `[K, BV]` float32 persists across grid steps in a VMEM scratch buffer. The head
and V-tile axes are "parallel" (split across TensorCores where a chip has several). The final
state's output block keeps one index over the chunk axis, so it stays resident and is written once.

Limits (Mosaic blocks: the last two dims are multiples of (8, 128) or the whole array dim): chunk
C % 8 == 0 (blocks (C, K), (C, C), (C, BV)); K % 8 == 0 (the per-chunk Gam_C and state blocks (K, 1),
(K, BV) cut from `[BH, N*K, .]`); V is one tile when V <= 128, else BV is a multiple of 128 dividing V.
The transposed products (Kt^T U, Qg^T dO, A^T dO, W^T dU) transpose a tile in VMEM; C, K and V
multiples of 128 fill the MXU and keep those transposes on native (8, 128) tiles. Matmuls follow
`jax.default_matmul_precision` ("highest": float32-exact MXU passes; the default: one bf16 pass).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunk_math import ChunkTerms, backward_operands, forward_pass_operands


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """a^T b, contracting the leading dims."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(*refs, names, n_chunks, emit_states):
    r = dict(zip(names, refs))
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        r["s"][...] = r["s0"][...]

    s = r["s"][...]
    if emit_states:
        r["out"][...] = s
    u = r["u_bar"][...]
    if "w" in r:
        u = u - _dot(r["w"][...], s)
    if not emit_states:
        r["out"][...] = _dot(r["q_decayed"][...], s) + _dot(r["attn"][...], u)
    s_next = r["chunk_decay"][...] * s + _dot_t(r["k_to_end"][...], u)
    r["s"][...] = s_next

    @pl.when(c == n_chunks - 1)
    def _():
        r["final"][...] = s_next


def _backward_kernel(*refs, names, n_chunks):
    r = dict(zip(names, refs))
    step = pl.program_id(2)  # works on chunk N-1-step: the index maps walk the chunks backwards

    @pl.when(step == 0)
    def _():
        r["ds"][...] = r["d_final"][...]

    ds = r["ds"][...]
    r["leaving_grad"][...] = ds
    do = r["do"][...]
    ds_new = r["chunk_decay"][...] * ds + _dot_t(r["q_decayed"][...], do)
    if "w" in r:
        du = _dot_t(r["attn"][...], do) + _dot(r["k_to_end"][...], ds)
        ds_new = ds_new - _dot_t(r["w"][...], du)
    r["ds"][...] = ds_new

    @pl.when(step == n_chunks - 1)
    def _():
        r["d_initial"][...] = ds_new


def _call(kernel, operands, outputs, *, state, grid, block_v, reverse, interpret, name):
    """pallas_call over grid (BH, V / BV, N). `operands` / `outputs` map the kernel's ref names to
    (array or output shape, block kind of `chunk_math.forward_pass_operands`): "chunk" (this chunk's
    rows, whole last dim), "chunk_v" (this chunk's rows, one V tile) or "head_v" (a `[K, BV]` block
    of the head, the same for every chunk).
    `reverse` walks the chunks from the last to the first. The `[K, BV]` VMEM scratch that carries the
    state (or its cotangent) across grid steps is the kernel's ref named `state`."""
    bh, n_v, n = grid
    at = (lambda c: n - 1 - c) if reverse else (lambda c: c)  # noqa: E731

    def spec(shape, kind):
        rows = shape[1] // n
        if kind == "chunk":
            return pl.BlockSpec((None, rows, shape[2]), lambda b, j, c: (b, at(c), 0))
        if kind == "chunk_v":
            return pl.BlockSpec((None, rows, block_v), lambda b, j, c: (b, at(c), j))
        return pl.BlockSpec((None, shape[1], block_v), lambda b, j, c: (b, 0, j))

    k_dim = operands["chunk_decay"][0].shape[1] // n
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    extra = {"interpret": pltpu.InterpretParams()} if interpret else {}
    return pl.pallas_call(
        functools.partial(kernel, names=tuple(operands) + tuple(outputs) + (state,)),
        out_shape=[f32(shape) for shape, _ in outputs.values()],
        grid=grid,
        in_specs=[spec(x.shape, kind) for x, kind in operands.values()],
        out_specs=[spec(shape, kind) for shape, kind in outputs.values()],
        scratch_shapes=[pltpu.VMEM((k_dim, block_v), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name=name,
        **extra,
    )(*(x for x, _ in operands.values()))


def forward_pass(terms: ChunkTerms, s0, *, emit_states, block_v, interpret):
    """(O `[BH, N*C, V]` or, with emit_states, the entering states `[BH, N*K, V]`; final state `[BH, K, V]`)."""
    operands, outputs, n = forward_pass_operands(terms, s0, emit_states=emit_states)
    bh, _, v_dim = outputs["final"][0]
    kernel = functools.partial(_forward_kernel, n_chunks=n, emit_states=emit_states)
    return _call(kernel, operands, outputs, grid=(bh, v_dim // block_v, n), block_v=block_v,
                 state="s", reverse=False, interpret=interpret,
                 name="gated_entering_states_tpu" if emit_states else "gated_state_pass_fwd_tpu")


def backward(terms: ChunkTerms, d_o, d_final, *, block_v: int, interpret: bool):
    """(cotangent of the state leaving each chunk `[BH, N, K, V]`, d initial state `[BH, K, V]`)."""
    operands, outputs, n = backward_operands(terms, d_o, d_final)
    bh, k_dim, v_dim = d_final.shape
    kernel = functools.partial(_backward_kernel, n_chunks=n)
    leaving_grad, d_initial = _call(kernel, operands, outputs, grid=(bh, v_dim // block_v, n),
                                    block_v=block_v, state="ds", reverse=True, interpret=interpret,
                                    name="gated_state_pass_bwd_tpu")
    return leaving_grad.reshape(bh, n, k_dim, v_dim), d_initial
