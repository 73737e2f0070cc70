"""Config checks and derived sizes the mixer layers share (their `check_config` and `dims`).

Every check raises the one error format of `hybrid_jax.checks`, ``<key>: <message>``, with the key
relative to the mixer config; the model config adds the letter and kind in front
(``model.mixers.K (kind 'kda'): num_heads: must be an int >= 1, got 0``).

Sizes: `heads_and_dim` gives (H, head_dim) with head_dim = d_model // H unless set; an `expand_*`
width is expand * d_model, split over the heads (`expanded_dim`).

Op options the layers pass through: `precision` (the matmul precision of the chunked ops, one of
`PRECISIONS` or None for the platform default) and `gate_lower_bound` (the safe per-channel gate's
bound, None or a number in [MIN_LOWER_BOUND, 0)).
"""
from __future__ import annotations

import ml_collections

from hybrid_jax.checks import check_choice, check_int, check_optional_int, check_positive_number, fail, is_number
from hybrid_jax.ops.gated import SUPPORTED as GATED_IMPLS
from hybrid_jax.ops._common import MIN_LOWER_BOUND, PRECISIONS

ConfigDict = ml_collections.ConfigDict


def check_ints(cfg: ConfigDict, *keys: str, minimum: int = 1) -> None:
    """Each of `keys` is an int >= minimum."""
    for key in keys:
        check_int(cfg, key, minimum=minimum)


def check_optional_ints(cfg: ConfigDict, *keys: str, minimum: int = 1) -> None:
    """Each of `keys` is None or an int >= minimum."""
    for key in keys:
        check_optional_int(cfg, key, minimum=minimum)


def check_positive_numbers(cfg: ConfigDict, *keys: str) -> None:
    """Each of `keys` is a number > 0."""
    for key in keys:
        check_positive_number(cfg, key)


def impl_names(supported) -> list[str]:
    return [impl.value for impl in supported]


def check_impl(cfg: ConfigDict, supported=GATED_IMPLS) -> None:
    """`impl` is one of the op's implementations (`supported`, an enum) and `chunk_size` an int >= 1."""
    check_choice(cfg, "impl", impl_names(supported))
    check_int(cfg, "chunk_size")


def check_precision(cfg: ConfigDict) -> None:
    """`precision` is None (the platform default) or one of the chunked ops' matmul precisions."""
    check_choice(cfg, "precision", (None, *PRECISIONS))


def check_gate_lower_bound(cfg: ConfigDict) -> None:
    """`gate_lower_bound` is None (unbounded gate) or a number in [MIN_LOWER_BOUND, 0)."""
    bound = cfg.gate_lower_bound
    if bound is not None and not (is_number(bound) and MIN_LOWER_BOUND <= bound < 0):
        fail("gate_lower_bound", f"must be None (the unbounded softplus gate) or a number in "
                                 f"[{MIN_LOWER_BOUND}, 0) (the safe gate's bound), got {bound!r}")


def heads_and_dim(cfg: ConfigDict, d_model: int) -> tuple[int, int]:
    """(num_heads, head_dim), head_dim defaulting to d_model // num_heads."""
    return cfg.num_heads, cfg.head_dim if cfg.head_dim is not None else d_model // cfg.num_heads


def check_heads(cfg: ConfigDict, d_model: int) -> None:
    """num_heads >= 1, and it divides d_model unless head_dim is given."""
    check_int(cfg, "num_heads")
    check_optional_int(cfg, "head_dim")
    if cfg.head_dim is None and d_model % cfg.num_heads:
        fail("num_heads", f"{cfg.num_heads} does not divide d_model={d_model}; choose num_heads among the "
                          f"divisors of d_model or set head_dim")


def expanded_dim(cfg: ConfigDict, key: str, d_model: int, heads: int) -> int:
    """Per-head dim of an `expand_*` width, d_model * expand / heads, which must be a positive int."""
    total = cfg[key] * d_model
    if not total == int(total) or int(total) % heads or total < heads:
        fail(key, f"{cfg[key]} gives a width of {total} for d_model={d_model}, which must be a positive "
                  f"multiple of num_heads={heads}")
    return int(total) // heads


def check_dt_range(cfg: ConfigDict) -> None:
    """dt_min, dt_max > 0 with dt_min <= dt_max (the log-uniform range of the initial dt)."""
    check_positive_numbers(cfg, "dt_min", "dt_max")
    if cfg.dt_min > cfg.dt_max:
        fail("dt_min", f"{cfg.dt_min} must be <= dt_max={cfg.dt_max}")
