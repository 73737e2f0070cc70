"""Parameter counts without allocating parameters, and matched sizes.

    non-embedding parameters = all parameters - token embedding - final norm and untied output head
                             = the sum over the blocks (mixer + FFN + the blocks' norms)

counted by `hybrid_jax.inspect.inspect_model` on the model built with `nnx.eval_shape` (shapes only).

Matching (`MatchParams`): the count grows monotonically with `model.d_model` or `model.mlp_dim`, so
for each point a bisection over multiples of `multiple_of` finds the value whose count is closest
to the target; the point fails with the count it reached if that is not within `tolerance`
(typically: d_model moves in steps too coarse for 2%; solve model.mlp_dim instead).
"""
from __future__ import annotations

import dataclasses
import functools

from experiments.sweep.spec import MatchParams, Point, Sweep, format_value, set_dotted
from hybrid_jax.config import validate
from hybrid_jax.inspect import inspect_model


@dataclasses.dataclass(frozen=True)
class Counts:
    non_embedding: int
    total: int


def count_params(config) -> Counts:
    """The config's parameter counts (nothing allocated)."""
    report = inspect_model(config, context=1)
    return Counts(non_embedding=report.total_params - report.embedding_params - report.head_params,
                  total=report.total_params)


def _count_with(sweep: Sweep, point: Point, key: str | None = None, value: int | None = None) -> int:
    config = sweep.point_config(point)
    if key is not None:
        set_dotted(config, key, value)
        validate(config)
    return count_params(config).non_embedding


def _solve(count, target: int, multiple: int) -> tuple[int, int]:
    """(value, count(value)) with value a multiple of `multiple` and count(value) closest to target."""
    cached = functools.lru_cache(maxsize=None)(lambda k: count(k * multiple))
    low, high = 1, 2
    while cached(high) < target:  # the count is increasing in the solved key
        low, high = high, high * 2
        if high * multiple > 1 << 20:
            raise ValueError(f"no value up to {high * multiple} reaches {target:,} parameters")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if cached(mid) < target else (low, mid)
    best = min((low, high), key=lambda k: abs(cached(k) - target))
    return best * multiple, cached(best)


def match_sizes(sweep: Sweep, log=print) -> tuple[tuple[Point, ...], int]:
    """The sweep's points with the matched key solved per point, and the target count."""
    match: MatchParams = sweep.match
    by_name = {point.name: point for point in sweep.points}
    if match.target == "first":
        target = _count_with(sweep, sweep.points[0])
    elif isinstance(match.target, str):
        if match.target not in by_name:
            raise ValueError(f"SWEEP['match_params']['target']: {match.target!r} is not a point; points are "
                             f"{sorted(by_name)}")
        target = _count_with(sweep, by_name[match.target])
    else:
        target = int(match.target)
    solved = []
    for point in sweep.points:
        value, count = _solve(lambda v: _count_with(sweep, point, match.solve, v), target, match.multiple_of)
        error = abs(count - target) / target
        if error > match.tolerance:
            raise ValueError(
                f"point {point.name}: the closest {match.solve} ({value}, multiples of {match.multiple_of}) gives "
                f"{count:,} non-embedding parameters, {100 * error:.1f}% from the target {target:,} (tolerance "
                f"{100 * match.tolerance:.1f}%); solve a finer-grained key such as model.mlp_dim")
        log(f"  {point.name}: {match.solve} = {format_value(value)} -> {count:,} non-embedding parameters "
            f"({100 * (count - target) / target:+.2f}%)")
        solved.append(dataclasses.replace(point, overrides={**point.overrides, match.solve: value}))
    return tuple(solved), target


__all__ = ["Counts", "count_params", "match_sizes"]
