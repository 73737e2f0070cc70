"""Pure mixer primitives: arrays in, arrays out (see DESIGN.md for the conventions)."""
from hybrid_jax.ops._common import Impl
from hybrid_jax.ops.delta import (
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    kda,
    kda_step,
)
from hybrid_jax.ops.linear_attention import gla, gla_step, linear_attention, linear_attention_step
from hybrid_jax.ops.first_order import linear_recurrence
from hybrid_jax.ops.log_linear import (
    FenwickState,
    fenwick_level,
    log_linear_attention,
    log_linear_attention_step,
)

__all__ = [
    "FenwickState", "Impl", "delta_rule", "delta_rule_step", "fenwick_level", "gated_delta_rule",
    "gated_delta_rule_step", "gla", "gla_step", "kda", "kda_step", "linear_attention",
    "linear_attention_step", "linear_recurrence", "log_linear_attention", "log_linear_attention_step",
]
