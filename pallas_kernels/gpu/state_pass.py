r"""Pallas Triton kernels (GPU, written for H100 / H200) for the sequential pass over chunks.

Inputs are the per-chunk terms of `pallas_kernels.chunk_math` in the kernel layout (`kernel_operands`):
Qg = Q * Gam (`q_decayed`), A = Tril(Aqk) (`attn`), Kt = K * exp(G_C - G) (`k_to_end`), Ubar (`u_bar`)
and W (`w`, delta only) as `[BH, N*C, .]`, and Gam_C (`chunk_decay`) as a `[K, 1]` column per chunk. One program per (head, V tile of BV columns); the state tile
S `[K, BV]` float32 stays in registers for the whole sequence, which the program walks chunk by chunk
(a fori_loop over its head's whole-sequence blocks; Triton pipelines the next chunk's loads).

`forward_pass` (outputs, or with emit_states=True the state entering every chunk and no O, for the backward):
    S = S_init
    for c in 0 .. N-1:
        [entering[c] = S]
        U   = Ubar_c - W_c S                                (non-delta: U = Ubar_c)
        [O_c = Qg_c S + A_c U]
        S   = Diag(Gam_C,c) S + Kt_c^T U
    final = S
`backward`, given dO and the final-state cotangent:
    dS = d_final
    for c in N-1 .. 0:
        leaving_grad[c] = dS                                (cotangent of the state leaving chunk c)
        dU  = A_c^T dO_c + Kt_c dS                          (delta only)
        dS  = Qg_c^T dO_c + Diag(Gam_C,c) dS - W_c^T dU
    d_initial = dS
S only mixes its rows (the K side), never its columns, so V tiles are independent programs:
grid (BH, V / BV).

Limits (Triton lowering): every tensor a kernel loads or multiplies has a power-of-two size and
tl.dot needs each dim >= 16, so C, K, V and BV are powers of two >= 16 (`pallas_kernels.api` pads K
and V that are multiples of 16 up to the next power of two). The state tile and one chunk of terms sit
in registers: K <= 256. Matmuls follow `jax.default_matmul_precision` (float32 "highest" is IEEE fp32;
the default lets Triton use TF32). jax 0.12 deprecates the Pallas Triton backend in favour of Mosaic
GPU; it still lowers and runs there (and on 0.11). Compiled and checked on an H200 with jax 0.11.2
(`experiments/bench/gpu_check.py`: every transition against the token recurrence, outputs, final
states and gradients within 1e-6 relative at float32 "highest").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunk_math import ChunkTerms, backward_operands, forward_pass_operands


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """a^T b, contracting the leading dims (Triton transposes the tile in registers)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _rows(c, size):
    """Rows of chunk c in a `[N*size, .]` block."""
    return pl.ds(pl.multiple_of(c * size, size), size)


def _forward_kernel(*refs, names, n_chunks, chunk, emit_states):
    r = dict(zip(names, refs))
    k_dim = r["s0"].shape[0]

    def step(c, s):
        rows = _rows(c, chunk)
        if emit_states:
            r["out"][_rows(c, k_dim), :] = s
        u = r["u_bar"][rows, :]
        if "w" in r:
            u = u - _dot(r["w"][rows, :], s)
        if not emit_states:
            r["out"][rows, :] = _dot(r["q_decayed"][rows, :], s) + _dot(r["attn"][rows, :], u)
        return r["chunk_decay"][_rows(c, k_dim), :] * s + _dot_t(r["k_to_end"][rows, :], u)

    r["final"][...] = jax.lax.fori_loop(0, n_chunks, step, r["s0"][...])


def _backward_kernel(*refs, names, n_chunks, chunk):
    r = dict(zip(names, refs))
    k_dim = r["d_final"].shape[0]

    def step(i, ds):
        c = n_chunks - 1 - i
        rows = _rows(c, chunk)
        r["leaving_grad"][_rows(c, k_dim), :] = ds
        do = r["do"][rows, :]
        ds_new = r["chunk_decay"][_rows(c, k_dim), :] * ds + _dot_t(r["q_decayed"][rows, :], do)
        if "w" in r:
            du = _dot_t(r["attn"][rows, :], do) + _dot(r["k_to_end"][rows, :], ds)
            ds_new = ds_new - _dot_t(r["w"][rows, :], du)
        return ds_new

    r["d_initial"][...] = jax.lax.fori_loop(0, n_chunks, step, r["d_final"][...])


# Triton's software pipeliner keeps `num_stages` copies of every tile a loop iteration loads in shared
# memory (228 KB per SM on H100 / H200); with K = 128, C = 64 one chunk's float32 tiles already take
# ~120 KB, so deeper pipelining is only asked for when two copies fit with room to spare.
PIPELINE_BYTES = 96 * 1024


def _call(kernel, operands, outputs, *, chunk, grid, block_v, interpret, name):
    """pallas_call over grid (BH, V / BV). `operands` / `outputs` map names (the kernel's ref names) to
    (array or output shape, block kind of `chunk_math.forward_pass_operands`); every block spans its
    head's whole time axis, V-tiled ("chunk_v", "head_v") or whole ("chunk")."""

    def spec(shape, kind):
        if kind != "chunk":
            return pl.BlockSpec((None, shape[1], block_v), lambda b, j: (b, 0, j))
        return pl.BlockSpec((None,) + tuple(shape[1:]), lambda b, j: (b, 0, 0))

    chunk_bytes = 4 * chunk * sum(x.shape[-1] if kind == "chunk" else block_v for x, kind in operands.values())
    params = plgpu.CompilerParams(num_warps=4, num_stages=2 if 2 * chunk_bytes <= PIPELINE_BYTES else 1)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return pl.pallas_call(
        functools.partial(kernel, names=tuple(operands) + tuple(outputs)),
        out_shape=[f32(shape) for shape, _ in outputs.values()],
        grid=grid,
        in_specs=[spec(x.shape, kind) for x, kind in operands.values()],
        out_specs=[spec(shape, kind) for shape, kind in outputs.values()],
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*(x for x, _ in operands.values()))


def forward_pass(terms: ChunkTerms, s0, *, emit_states, block_v, interpret):
    """(O `[BH, N*C, V]` or, with emit_states, the entering states `[BH, N*K, V]`; final state `[BH, K, V]`)."""
    operands, outputs, n = forward_pass_operands(terms, s0, emit_states=emit_states)
    chunk, (bh, _, v_dim) = terms.attn.shape[-1], outputs["final"][0]
    kernel = functools.partial(_forward_kernel, n_chunks=n, chunk=chunk, emit_states=emit_states)
    return _call(kernel, operands, outputs, chunk=chunk, grid=(bh, v_dim // block_v), block_v=block_v,
                 interpret=interpret,
                 name="gated_entering_states_gpu" if emit_states else "gated_state_pass_fwd_gpu")


def backward(terms: ChunkTerms, d_o, d_final, *, block_v: int, interpret: bool):
    """(cotangent of the state leaving each chunk `[BH, N, K, V]`, d initial state `[BH, K, V]`)."""
    operands, outputs, n = backward_operands(terms, d_o, d_final)
    chunk, (bh, k_dim, v_dim) = terms.attn.shape[-1], d_final.shape
    kernel = functools.partial(_backward_kernel, n_chunks=n, chunk=chunk)
    leaving_grad, d_initial = _call(kernel, operands, outputs, chunk=chunk, grid=(bh, v_dim // block_v),
                                    block_v=block_v, interpret=interpret, name="gated_state_pass_bwd_gpu")
    return leaving_grad.reshape(bh, n, k_dim, v_dim), d_initial
