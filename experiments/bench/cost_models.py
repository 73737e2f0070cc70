r"""The mixer benchmark's cost models: analytic forward FLOPs and a coarse memory guess per op and impl.

Sizes: batch B, time T, heads H, head dim D (K = V = D for the attention-like mixers; SSD uses N = P = D;
Mamba's selective scan uses D_inner = H * D channels with N = 16 states each). FLOPs count a
multiply-add as 2 and one exp / elementwise op as 1, per batch row and head, for the *forward* pass of
the algorithm the impl really runs (the masked upper triangles of the C x C in-chunk blocks are counted:
the chunked code computes them). With N = ceil(T / C) chunks of C positions and sub-chunks of s = 16
(`pallas_kernels.chunk_math.chunk_length` / `sub_chunk_length`):

* softmax attention (causal): T^2 (K + V) -- QK^T and PV, 2 T^2 D each, halved by the causal mask
  (the useful work, the FlashAttention convention; the impls execute the masked half too).
* gated family, impl "reference" (per token): readout 2KV, write 2KV, decay KV when gated, and for the
  delta rule the recall k^T S (2KV) and the scaled correction (V).
* gated family, impl "scan": ~2T combines (work-efficient scan). Non-delta: elementwise (a, b) pairs on
  K x V states, 3KV a combine, plus the writes KV and readout 2KV per token. Delta: matrix pairs,
  2K^3 + 2K^2 V + KV a combine, plus building M (3K^2), X (2KV) and the readout 2KV per token.
* gated family, impl "chunk" (per chunk, mirroring `hybrid_jax.ops.gated`):
      Aqk = 2C^2 K (+ 3CsK for the per-channel diagonal sub-blocks; with the safe gate, whose diagonal
      blocks are matmuls through a mid-sub-chunk reference, + (C/s) CK for the key factors of each
      query sub-chunk and 2CK for the query factors instead), outputs (Q Gam) S_0 = 2CKV and
      Tril(Aqk) U = 2C^2 V, state write (K e^{G_C - G})^T U = 2CKV, carry 2KV;
      delta adds Akk (as Aqk), the unit-lower inverse 2C(C^2 - 1)/3 (doubling rounds of
      block matmuls, `pallas_kernels.intra_chunk.invert_unit_lower`), W = 2C^2 K, Ubar = 2C^2 V, and W S_0 twice
      (once in the carry scan, once for the outputs) = 4CKV.
* ssd: the non-delta chunk/scan/reference count with a scalar decay, K = N, V = P, plus D x (TP).
* selective_scan: per (t, channel, state) element, reference 8 (log decay, write, exp, update,
  readout), chunk 12 (adds the in-chunk cumulative decay, its exp and the carry fix-up), scan 14.
* rg_lru (x, gates `[B, T, H, D]`): per (t, channel) element, the gates to (log a, write) 8 (log a,
  exp, 2 log a, expm1, sqrt, the two products of the write), then the update 2: reference 10,
  chunk 14, scan 16 (the same extras as selective_scan).
* block_sparse (top_k = 8 blocks of 64 keys): the selection scores every pooled key, 2 T NB D with
  NB = ceil(T / 64), plus 4 D per (query, key) pair attended: the (top_k + 1) 64 gathered keys of a
  query (chunk; the masked part of its own block included) or all T keys (reference, dense masked).

Forward + backward is counted as 3x the forward (the backward of a matmul is two matmuls).
`estimate_bytes` is a coarse upper guess of the live float32 intermediates, used only to skip
configurations that obviously do not fit before compiling them; the compiled executable's
`memory_analysis()` is the binding check.
"""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels.chunk_math import chunk_length, sub_chunk_length  # how the chunk form cuts T

SSM_STATE = 16  # Mamba-1 state size per channel
SOFTMAX_BLOCK = 128
BACKWARD_FLOP_FACTOR = 3
SPARSE_BLOCK, SPARSE_TOP_K = 64, 8  # block-sparse attention: keys per block, earlier blocks each query reads


@dataclasses.dataclass(frozen=True)
class Dims:
    batch: int
    time: int
    heads: int
    head_dim: int
    chunk_size: int = 64


# ----------------------------------------------------------------------------- FLOPs


def chunks(d: Dims, per_channel: bool) -> tuple[int, int, int]:
    """(chunk length C, number of chunks N, sub-chunk length s) as the chunked form cuts T."""
    c = chunk_length(d.time, d.chunk_size, per_channel=per_channel)
    return c, math.ceil(d.time / c), sub_chunk_length(c)


def gated_flops(
    d: Dims,
    impl: str,
    *,
    delta: bool,
    decayed: bool,
    per_channel: bool,
    safe_gate: bool = False,
) -> float:
    """Forward FLOPs of the gated family (module docstring) for all batch rows and heads; `safe_gate`
    (per channel only) counts the safe gate's in-chunk products."""
    k = v = d.head_dim
    t = d.time
    if impl == "reference":
        per_token = 4 * k * v + (k * v if decayed else 0) + (2 * k * v + v if delta else 0)
        total = t * per_token
    elif impl == "scan":
        if delta:
            total = t * (2 * (2 * k**3 + 2 * k * k * v + k * v) + 3 * k * k + 4 * k * v)
        else:
            total = t * (2 * 3 * k * v + 3 * k * v)
    elif impl == "chunk":
        c, n, s = chunks(d, per_channel)
        decay_work = ((c // s) * c * k + 2 * c * k) if safe_gate else 3 * c * s * k
        products = 2 * c * c * k + (decay_work if per_channel else 0)
        per_chunk = products + 2 * c * k * v + 2 * c * c * v + 2 * c * k * v + 2 * k * v
        if delta:
            per_chunk += products + 2 * c * (c * c - 1) / 3 + 2 * c * c * k + 2 * c * c * v + 4 * c * k * v
        total = n * per_chunk
    else:
        raise ValueError(f"gated_flops: no FLOP formula for impl={impl!r}")
    return float(total * d.batch * d.heads)


def softmax_flops(d: Dims, impl: str) -> float:
    # T^2 (K + V) with K = V = D: the causal half of QK^T and PV.
    return float(d.time**2 * 2 * d.head_dim * d.batch * d.heads)


def ssd_flops(d: Dims, impl: str) -> float:
    core = gated_flops(d, impl, delta=False, decayed=True, per_channel=False)
    return core + float(d.batch * d.time * d.heads * d.head_dim)


def selective_flops(d: Dims, impl: str) -> float:
    per_element = {"reference": 8, "chunk": 12, "scan": 14}[impl]
    return float(per_element * d.batch * d.time * d.heads * d.head_dim * SSM_STATE)


def rg_lru_flops(d: Dims, impl: str) -> float:
    per_element = {"reference": 10, "chunk": 14, "scan": 16}[impl]
    return float(per_element * d.batch * d.time * d.heads * d.head_dim)


def block_sparse_flops(d: Dims, impl: str) -> float:
    keys = d.time if impl == "reference" else (SPARSE_TOP_K + 1) * SPARSE_BLOCK
    per_query = 2 * math.ceil(d.time / SPARSE_BLOCK) * d.head_dim + 4 * keys * d.head_dim
    return float(d.batch * d.heads * d.time * per_query)


# ----------------------------------------------------------------------------- memory guesses

F32 = 4


def input_bytes(d: Dims) -> float:
    return 4 * d.batch * d.time * d.heads * d.head_dim * F32


def gated_bytes(d: Dims, impl: str, backward: bool, *, delta: bool, per_channel: bool = False) -> float:
    bh, t, k = d.batch * d.heads, d.time, d.head_dim
    factor = 3 if backward else 1
    if impl == "reference":
        # The backward of lax.scan keeps the carry (the K x V state, twice for the delta recall) per step.
        live = bh * t * k * k * F32 * ((2 if delta else 1) if backward else 0)
    elif impl == "scan":
        per_token = (k * k + k * k) if delta else k * k  # transitions M and writes X (K x K, K x V)
        live = bh * t * per_token * F32 * (8 if backward else 3)
    else:
        c, n, s = chunks(d, per_channel)
        per_token = c + k * (s + c // s) * (2 if delta else 1) + 4 * k
        live = (bh * t * per_token + bh * n * k * k) * F32 * (6 if backward else 2)
    return factor * input_bytes(d) + live


def softmax_bytes(d: Dims, impl: str, backward: bool) -> float:
    bh, t = d.batch * d.heads, d.time
    if impl == "chunk":
        live = bh * t * (min(SOFTMAX_BLOCK, t) + 4 * d.head_dim) * F32 * (3 if backward else 1)
    else:  # reference and xla materialise the T x T logits (and the weights)
        live = bh * t * t * F32 * (4 if backward else 2)
    return (3 if backward else 1) * input_bytes(d) + live


def selective_bytes(d: Dims, impl: str, backward: bool) -> float:
    elements = d.batch * d.time * d.heads * d.head_dim * SSM_STATE
    return elements * F32 * {"reference": 3, "chunk": 5, "scan": 6}[impl] * (3 if backward else 1)


def rg_lru_bytes(d: Dims, impl: str, backward: bool) -> float:
    # four inputs, log a, the write and the states (chunk and scan: local states and decays too)
    elements = d.batch * d.time * d.heads * d.head_dim
    return elements * F32 * {"reference": 7, "chunk": 9, "scan": 10}[impl] * (3 if backward else 1)


def block_sparse_bytes(d: Dims, impl: str, backward: bool) -> float:
    if impl == "reference":  # the dense masked form holds T x T logits like softmax's reference
        return softmax_bytes(d, impl, backward)
    # One query block's gathered keys, values and logits, plus per-token indices and statistics.
    block = SPARSE_BLOCK * (SPARSE_TOP_K + 1) * SPARSE_BLOCK * (2 * d.head_dim + 1)
    live = d.batch * d.heads * (block + d.time * (2 * SPARSE_TOP_K + 4 * d.head_dim)) * F32
    return (3 if backward else 1) * (input_bytes(d) + live)


# ----------------------------------------------------------------------------- log-linear attention


def log_linear_flops(d: Dims, impl: str, levels: int) -> float:
    """Log-linear attention over the Mamba-2 transition (scalar decay, no delta), L Fenwick levels."""
    k = v = d.head_dim
    if impl == "reference":  # every level decays (KV) and is read (2KV); one write (2KV)
        per_head = d.time * (3 * k * v * levels + 2 * k * v)
    elif impl == "scan":  # per level >= 1, an associative scan over K x K transitions
        per_head = d.time * (levels - 1) * (2 * (2 * k**3 + 2 * k * k * v)) + d.time * 2 * k * v * levels
    else:  # the gated chunk form, the lambda weighting of Tril(Aqk), the read of S = I and of the stack
        c, n, _ = chunks(d, per_channel=False)
        inter = max(levels - int(math.log2(c)) - 1, 0)
        per_head = n * (c * c + 2 * c * k * k + 2 * c * k * v * inter + 3 * k * v * inter)
        return gated_flops(d, impl, delta=False, decayed=True, per_channel=False) + per_head * d.batch * d.heads
    return float(per_head * d.batch * d.heads)


def log_linear_bytes(d: Dims, impl: str, backward: bool, levels: int) -> float:
    bh, t, k = d.batch * d.heads, d.time, d.head_dim
    if impl == "reference":
        return input_bytes(d) * 3 + (bh * t * levels * k * k * F32 if backward else 0)
    if impl == "scan":
        return bh * t * levels * 2 * k * k * F32 * (8 if backward else 3)
    _, n, _ = chunks(d, per_channel=False)
    stack = bh * n * levels * k * k * F32 * (3 if backward else 1)
    return gated_bytes(d, impl, backward, delta=False) + stack
