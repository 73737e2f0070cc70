"""Pure mixer primitives: arrays in, arrays out. Conventions (shapes `[B, T, H, D]`, gates in log
space, state layout `[B, HV, K, V]`, impl names) are in the repository's docs/conventions.md.

The one output-dtype rule: every op and every `*_step` returns its output in the dtype of its value
input -- v for the attention-like ops (linear attention, GLA, the delta rule family, log-linear
attention; softmax attention, where q, k and v must share one dtype), x for `ssd` and `rg_lru`, u for
`selective_scan`. States are float32 whatever the inputs; `linear_recurrence` returns float32.

Importing this package loads no Triton or Mosaic module: the Pallas kernels load when an impl
resolves to them (impl="pallas", or "auto" on a GPU).
"""
from hybrid_jax.ops._common import Impl
from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import kv_cache_update, softmax_attention_step
from hybrid_jax.ops.delta import (
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    kda,
    kda_step,
)
from hybrid_jax.ops.first_order import linear_recurrence
from hybrid_jax.ops.linear_attention import gla, gla_step, linear_attention, linear_attention_step
from hybrid_jax.ops.log_linear import (
    FenwickState,
    empty_fenwick_state,
    fenwick_level,
    log_linear_attention,
    log_linear_attention_masked,
    log_linear_attention_step,
    num_levels,
)
from hybrid_jax.ops.rg_lru import rg_lru, rg_lru_step
from hybrid_jax.ops.sparse_attention import (
    block_sparse_attention,
    block_token_attention,
    pool_block_keys,
)
from hybrid_jax.ops.sparse_attention_decode import block_keys_update, block_sparse_attention_step
from hybrid_jax.ops.ssm import selective_scan, selective_scan_step, ssd, ssd_step

__all__ = [
    "FenwickState", "Impl", "block_keys_update", "block_sparse_attention", "block_sparse_attention_step",
    "block_token_attention", "delta_rule", "delta_rule_step", "empty_fenwick_state", "fenwick_level",
    "gated_delta_rule", "gated_delta_rule_step", "gla", "gla_step", "kda", "kda_step", "kv_cache_update",
    "linear_attention", "linear_attention_step", "linear_recurrence", "log_linear_attention",
    "log_linear_attention_masked", "log_linear_attention_step", "num_levels", "pool_block_keys", "rg_lru",
    "rg_lru_step", "selective_scan", "selective_scan_step", "softmax_attention", "softmax_attention_step",
    "ssd", "ssd_step",
]
