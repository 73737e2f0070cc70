"""A sweep's results: one row per point from its metrics.jsonl, as results.csv, results.md and plots.

Columns: the point's name and status, the swept keys (and the solved key of matched sizes),
`params` (non-embedding) and `total_params`, the steps trained, `train_loss` (the last train
record: the mean loss of its logging window), the final evaluation on the whole validation set
(`val_loss`, `val_perplexity`, and `val_bits_per_byte` for text or `val_accuracy` for the
synthetic tasks), `tokens_per_sec` (mean over the train records, compilation excluded) and
`wall_sec` (the runner's attempts at the point, `runner.wall_seconds`).

A plot spec {"x": key, "y": column, "series": key, "facet": key} draws y against x, one line per
series value, one panel per facet value; a non-numeric x (a preset, a pattern, "name") is drawn as
categories in point order. Written as `<y>_vs_<x>.png`.
"""
from __future__ import annotations

import csv
import math
import os
import re

from experiments.sweep.runner import is_finished, wall_seconds
from experiments.sweep.spec import Point, Sweep
from hybrid_jax.train.metrics import read_metrics

METRIC_COLUMNS = ("params", "total_params", "steps", "train_loss", "val_loss", "val_perplexity",
                  "val_bits_per_byte", "val_accuracy", "tokens_per_sec", "wall_sec")


def point_row(point: Point, workdir: str, counts) -> dict:
    """The results row of one point (metrics left empty when it has not reached them)."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if "loss" in r]
    final = next((r for r in records if r.get("final")), {})
    rates = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    row = {"name": point.name, "status": "finished" if is_finished(workdir) else "unfinished",
           **point.describe(), "params": counts.non_embedding, "total_params": counts.total,
           "steps": train[-1]["step"] if train else 0, "train_loss": train[-1]["loss"] if train else None}
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte", "val_accuracy"):
        row[key] = final.get(key)
    row["tokens_per_sec"] = sum(rates) / len(rates) if rates else None
    row["wall_sec"] = wall_seconds(workdir)
    return row


def columns(sweep: Sweep, rows: list[dict]) -> list[str]:
    """name, status, the keys that vary or were solved, then the metrics any row has."""
    keys = [k for k in rows[0] if k not in METRIC_COLUMNS and k not in ("name", "status")]
    shown = [k for k in keys if k in sweep.swept_keys or (sweep.match and k == sweep.match.solve)]
    metrics = [c for c in METRIC_COLUMNS if any(row.get(c) is not None for row in rows)]
    return ["name", "status", *shown, *metrics]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_tables(sweep: Sweep, rows: list[dict], out: str) -> tuple[str, str]:
    """results.csv (raw values) and results.md (formatted) under `out`."""
    cols = columns(sweep, rows)
    csv_path, md_path = os.path.join(out, "results.csv"), os.path.join(out, "results.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"| {' | '.join(cols)} |", f"|{'|'.join('---' for _ in cols)}|"]
    lines += [f"| {' | '.join(_cell(row.get(c)) for c in cols)} |" for row in rows]
    with open(md_path, "w") as f:
        f.write(f"Sweep `{sweep.name}` ({len(rows)} points; params = non-embedding parameters)\n\n")
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _draw(ax, rows: list[dict], spec: dict, categories: list) -> None:
    x_key, y_key, series_key = spec["x"], spec["y"], spec.get("series")
    series_values = list(dict.fromkeys(row.get(series_key) for row in rows)) if series_key else [None]
    for value in series_values:
        chosen = [r for r in rows if (series_key is None or r.get(series_key) == value) and r.get(y_key) is not None]
        if not chosen:
            continue
        xs = [r[x_key] if not categories else categories.index(r[x_key]) for r in chosen]
        pairs = sorted(zip(xs, [r[y_key] for r in chosen]))
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-", label=None if value is None else str(value))
    if categories:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=30, ha="right")
    elif spec.get("logx", True) and all(r[x_key] > 0 for r in rows):
        ax.set_xscale("log", base=2)
    ax.set(xlabel=x_key, ylabel=y_key)
    ax.grid(alpha=0.3)
    if series_key and len(series_values) > 1:
        ax.legend(fontsize=7, title=series_key, title_fontsize=7)


def plot(sweep: Sweep, rows: list[dict], spec: dict, out: str) -> str | None:
    """One plot spec drawn to `<y>_vs_<x>.png`; None when no row has the y value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key, facet_key = spec["x"], spec["y"], spec.get("facet")
    if not any(row.get(y_key) is not None for row in rows):
        return None
    values = list(dict.fromkeys(row.get(x_key) for row in rows))
    categories = [] if all(_is_number(v) for v in values) else values
    facets = list(dict.fromkeys(row.get(facet_key) for row in rows)) if facet_key else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(4.2 * len(facets) + 1, 3.8), dpi=120, squeeze=False,
                             sharey=True)
    for ax, facet in zip(axes[0], facets):
        _draw(ax, [r for r in rows if facet_key is None or r.get(facet_key) == facet], spec, categories)
        if facet_key:
            ax.set_title(f"{facet_key} = {facet}", fontsize=9)
    if y_key == "val_accuracy":
        axes[0][0].set_ylim(0, 1.02)
    fig.suptitle(spec.get("title", f"{sweep.name}: {y_key} vs {x_key}"))
    fig.tight_layout()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{y_key}_vs_{x_key}") + ".png"
    path = os.path.join(out, name)
    fig.savefig(path)
    plt.close(fig)
    return path


def default_plots(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Without plot specs: the main metric against the first swept key, one line per second one."""
    y = "val_accuracy" if any(r.get("val_accuracy") is not None for r in rows) else "val_loss"
    keys = list(sweep.swept_keys) or ["name"]
    spec = {"x": keys[0], "y": y}
    if len(keys) > 1:
        spec["series"] = keys[1]
    return [spec]


def write_results(sweep: Sweep, points: tuple[Point, ...], out: str, counts: dict) -> list[str]:
    """Tables and plots for the points (all of them, finished or not); returns the files written."""
    rows = [point_row(point, os.path.join(out, point.name), counts[point.name]) for point in points]
    written = list(write_tables(sweep, rows, out))
    for spec in sweep.plots or default_plots(sweep, rows):
        path = plot(sweep, rows, spec, out)
        if path:
            written.append(path)
    return written


__all__ = ["METRIC_COLUMNS", "columns", "plot", "point_row", "write_results", "write_tables"]
