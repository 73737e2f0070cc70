"""Config value checks, one set for the config schema, the mixer layers and the trainer.

Every check raises one `ValueError` whose message starts with the full key of the bad value and
says what is valid, e.g. ``train.warmup_steps: 700 must be smaller than train.steps (600)`` or
``model.mixers.K (kind 'kda'): num_heads: must be an int >= 1, got 0``. Sections are ConfigDicts
(or dicts); `prefix` is the dotted path of the section, "" for a mixer config (whose caller adds
the letter and the kind).

This module imports nothing of the project, so `ops`, `nn`, `config` and `train` can all use it.
"""
from __future__ import annotations

import numbers
from typing import Any, NoReturn, Sequence


def key_path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def fail(key: str, message: str) -> NoReturn:
    """Raises the one error format: ``<key>: <message>``."""
    raise ValueError(f"{key}: {message}")


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(value: Any, name: str, *, minimum: int = 1, below: int | None = None) -> int:
    """`value` is an int >= minimum (and < below, if given); returns it as a Python int."""
    if not is_int(value) or value < minimum or (below is not None and value >= below):
        bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        fail(name, f"must be an int {bound}, got {value!r}")
    return int(value)


def check_int(section, key: str, *, minimum: int = 1, prefix: str = "") -> int:
    """`section[key]` is an int >= minimum; returns it."""
    return require_int(section[key], key_path(prefix, key), minimum=minimum)


def check_optional_int(section, key: str, *, minimum: int = 1, prefix: str = "") -> int | None:
    """`section[key]` is None or an int >= minimum."""
    return None if section[key] is None else check_int(section, key, minimum=minimum, prefix=prefix)


def check_number(section, key: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, prefix: str = "") -> float:
    """`section[key]` is a number inside the interval given by low / high (either may be open)."""
    value = section[key]
    ok = is_number(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        fail(key_path(prefix, key), f"must be a number {_interval(low, high, low_inclusive, high_inclusive)}, "
                                    f"got {value!r}")
    return value


def check_positive_number(section, key: str, *, prefix: str = "") -> float:
    return check_number(section, key, low=0, low_inclusive=False, prefix=prefix)


def check_choice(section, key: str, choices: Sequence, *, prefix: str = "") -> Any:
    """`section[key]` is one of `choices`."""
    value = section[key]
    if value not in choices:
        fail(key_path(prefix, key), f"{value!r} is not valid; valid values are {list(choices)}")
    return value


def check_divides(divisor_key: str, divisor: int, total_key: str, total: int) -> None:
    """`divisor` divides `total` (both already checked to be positive ints)."""
    if total % divisor:
        fail(divisor_key, f"{divisor} must divide {total_key} ({total})")


def check_known_keys(config, schema, prefix: str = "", *, defaults: str, opaque: Sequence[str] = ()) -> None:
    """`config` has exactly the keys of `schema`, recursing into sections (dicts / ConfigDicts) except
    the dotted paths in `opaque`, whose contents their own checks own (e.g. "model.mixers").
    `defaults` names the function that builds complete configs, for the missing-key message."""
    for key in schema.keys():
        if key not in config:
            fail(key_path(prefix, key), f"missing; build configs from {defaults}")
    for key in config.keys():
        full = key_path(prefix, key)
        if key not in schema:
            fail(full, f"unknown config key; valid keys{' in ' + prefix if prefix else ''} are {sorted(schema.keys())}")
        if full not in opaque and hasattr(schema[key], "keys"):
            if not hasattr(config[key], "keys"):
                fail(full, f"must be a config section, got {config[key]!r}")
            check_known_keys(config[key], schema[key], full, defaults=defaults, opaque=opaque)


def check_optimiser(section, prefix: str) -> None:
    """The AdamW + warmup-cosine keys that `hybrid_jax.train.optim.make_optimizer` reads."""
    check_int(section, "steps", prefix=prefix)
    check_int(section, "warmup_steps", minimum=0, prefix=prefix)
    if section.warmup_steps >= section.steps:  # the cosine decay needs at least one step after the warmup
        fail(key_path(prefix, "warmup_steps"),
             f"{section.warmup_steps} must be smaller than {key_path(prefix, 'steps')} ({section.steps})")
    check_positive_number(section, "learning_rate", prefix=prefix)
    check_number(section, "min_learning_rate_ratio", low=0, high=1, prefix=prefix)
    for key in ("b1", "b2"):
        check_number(section, key, low=0, high=1, high_inclusive=False, prefix=prefix)
    check_number(section, "weight_decay", low=0, prefix=prefix)
    check_number(section, "grad_clip", low=0, prefix=prefix)  # 0 turns clipping off
    check_positive_number(section, "adam_eps", prefix=prefix)


def _interval(low, high, low_inclusive, high_inclusive) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high}"
    return "(any)"
