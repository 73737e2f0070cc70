"""Sweep files: a config file that also says which points to run.

A sweep file is an ordinary config file (`get_config(arg)`, loadable by the trainer) plus a
`SWEEP` dict:

    SWEEP = {
        "preset": "tiny",                     # the get_config argument of every point (default:
                                              # none, get_config() is called without one)
        "grid": {"preset": ["attention", "kda"], "model.d_model": [32, 64]},  # cartesian product;
                                              # or a list of such dicts (their union, in order)
        "points": [{"preset": "kda", "train.steps": 50}],   # explicit points (optional)
        "name": "{preset}-d{model.d_model}",  # point names: a template over the point's keys, or a
                                              # function point -> str (default: key=value parts)
        "match_params": {"solve": "model.mlp_dim", "target": "first", "multiple_of": 8,
                         "tolerance": 0.02},  # optional: hold the non-embedding parameter count
        "plots": [{"x": "model.d_model", "y": "val_accuracy", "series": "preset",
                   "facet": "data.mqar.num_kv_pairs"}],
        "config": "experiments/configs/kimi_linear.py",   # optional: the config file the points
                                              # train, relative to the repository root (default:
                                              # the sweep file itself)
    }

A point is a dict of dotted config keys (plus "preset", the get_config argument); it trains as

    python -m hybrid_jax.train --config CONFIG:PRESET --workdir OUT/NAME --config.KEY=VALUE ...
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from hybrid_jax.config import config_module, load_config

PRESET = "preset"  # the point key that is the get_config argument, not a config key
_KNOWN_KEYS = {"preset", "grid", "points", "name", "match_params", "plots", "config"}
_NAME_FIELD = re.compile(r"\{([^{}]+)\}")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@dataclasses.dataclass(frozen=True)
class MatchParams:
    """Solve `solve` (a config key, in multiples of `multiple_of`) per point so that the point's
    non-embedding parameter count is within `tolerance` of `target` (an int, or the name of a
    point whose own count is the target, or "first": the first point's)."""

    solve: str
    target: int | str = "first"
    multiple_of: int = 8
    tolerance: float = 0.02


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]  # dotted config keys -> values; "preset" excluded
    preset: str | None  # the get_config argument (None: get_config())

    def flags(self) -> list[str]:
        """The overrides as trainer flags."""
        return [f"--config.{key}={format_value(value)}" for key, value in self.overrides.items()]

    def describe(self) -> dict[str, Any]:
        return {PRESET: self.preset, **self.overrides}


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str  # the sweep file
    config_path: str  # the config file the points train
    points: tuple[Point, ...]
    swept_keys: tuple[str, ...]  # the keys that vary (and "preset" when it does), in grid order
    match: MatchParams | None
    plots: tuple[dict, ...]

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def config_spec(self, point: Point, path: str | None = None) -> str:
        """`path` (default: the config file) with the point's get_config argument, if it has one."""
        path = path or self.config_path
        return path if point.preset is None else f"{path}:{point.preset}"

    def point_config(self, point: Point):
        """The point's full config (validated), built in this process."""
        config = load_config(self.config_spec(point))
        for key, value in point.overrides.items():
            set_dotted(config, key, value)
        return config


def format_value(value: Any) -> str:
    """A value as ml_collections' config flags parse it (strings raw, everything else its repr)."""
    return value if isinstance(value, str) else repr(value)


def set_dotted(config, key: str, value: Any) -> None:
    """`config.a.b.c = value` for key "a.b.c"; ValueError naming the key if it does not exist."""
    *parents, leaf = key.split(".")
    section = config
    for i, part in enumerate(parents):
        if part not in section:
            raise ValueError(f"{'.'.join(parents[:i + 1])}: no such config section (sweep key {key!r})")
        section = section[part]
    if leaf not in section:
        raise ValueError(f"{key}: no such config key; valid keys here are {sorted(section.keys())}")
    section[leaf] = value


def grid(axes: Mapping[str, list]) -> list[dict]:
    """The cartesian product of `axes` (key -> values), the last key varying fastest."""
    for key, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep grid: {key!r} must map to a non-empty list of values, got {values!r}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _raw_points(spec: Mapping) -> list[dict]:
    grids = spec.get("grid", [])
    grids = [grids] if isinstance(grids, Mapping) else list(grids)
    points = [p for g in grids for p in grid(g)] + [dict(p) for p in spec.get("points", [])]
    if not points:
        raise ValueError("SWEEP: give a 'grid' (dict or list of dicts) or a 'points' list; it has no points")
    default_preset = spec.get("preset")
    unique = []
    for point in points:
        point = {PRESET: default_preset, **point}
        if point not in unique:
            unique.append(point)
    return unique


def _namer(spec: Mapping, swept: tuple[str, ...]) -> Callable[[dict], str]:
    name = spec.get("name")
    if callable(name):
        return name
    if name is None:
        return lambda point: "_".join(f"{key.rsplit('.', 1)[-1]}={point[key]}" for key in swept) or "point"

    def from_template(point: dict) -> str:
        def field(match):
            if match.group(1) not in point:
                raise ValueError(f"SWEEP['name']: {{{match.group(1)}}} is not a key of point {point}")
            return str(point[match.group(1)])

        return _NAME_FIELD.sub(field, name)

    return from_template


def load_sweep(path: str) -> Sweep:
    """The sweep in the file at `path` (checked: known keys, unique readable names)."""
    module = config_module(path)
    spec = getattr(module, "SWEEP", None)
    if not isinstance(spec, Mapping):
        raise ValueError(f"sweep file {path!r} defines no SWEEP dict (see experiments/sweep/spec.py)")
    unknown = sorted(set(spec) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"SWEEP: unknown key(s) {unknown}; valid keys are {sorted(_KNOWN_KEYS)}")
    raw = _raw_points(spec)
    keys = list(dict.fromkeys(key for point in raw for key in point))
    swept = tuple(key for key in keys if len({repr(point.get(key)) for point in raw}) > 1)
    namer = _namer(spec, swept)
    points, seen = [], set()
    for point in raw:
        name = namer(point)
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise ValueError(f"SWEEP: point name {name!r} (of {point}) must be a non-empty file name of letters, "
                             "digits and . _ = + -")
        if name in seen:
            raise ValueError(f"SWEEP: two points are both named {name!r}; put the keys that differ in SWEEP['name']")
        seen.add(name)
        preset = None if point[PRESET] is None else str(point[PRESET])
        points.append(Point(name, {k: v for k, v in point.items() if k != PRESET}, preset))
    match = spec.get("match_params")
    config_path = os.path.join(_REPO_ROOT, spec["config"]) if "config" in spec else os.path.abspath(path)
    return Sweep(path=path, config_path=config_path, points=tuple(points), swept_keys=swept,
                 match=None if match is None else MatchParams(**match), plots=tuple(spec.get("plots", ())))


__all__ = ["MatchParams", "PRESET", "Point", "Sweep", "format_value", "grid", "load_sweep", "set_dotted"]
