"""Analysis and output of the mixer benchmark: scaling exponents, softmax crossovers, tables, the plot.

* exponent p: the least-squares slope of log(time) against log(T) over the measured lengths
  (time ~ T^p; 1 is linear, 2 quadratic).
* crossover: the length from which a mixer stays faster than softmax attention, taking the fastest
  measured softmax impl at each length, interpolated linearly in (log T, log time ratio) between the
  last length where the mixer is slower and the next one; "below range" if it is faster at every
  measured length, "never in range" if it is still slower at the largest.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.bench.host_memory import PAGE_BYTES
from hybrid_jax import plotting

MODES = ("fwd", "fwd_bwd")
MODE_TITLES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
BASELINE = "softmax"
PAGE_MIB = PAGE_BYTES / 2**20  # page faults -> MiB first-touched


def series(rows, mixer, impl, mode):
    """[(T, seconds)] of the measured (not skipped or failed) points of one line, sorted by T."""
    points = [
        (r["T"], r[mode]["seconds"])
        for r in rows
        if r["mixer"] == mixer and r["impl"] == impl and r[mode]["status"] == "ok"
    ]
    return sorted(points)


def scaling_exponent(points):
    if len(points) < 2:
        return None
    log_t, log_s = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(log_t, log_s, 1)[0])


def baseline_times(rows, mode):
    """{T: fastest softmax time} over the softmax impls measured at T."""
    best: dict[int, float] = {}
    for r in rows:
        if r["mixer"] == BASELINE and r[mode]["status"] == "ok":
            best[r["T"]] = min(best.get(r["T"], math.inf), r[mode]["seconds"])
    return best


def crossover(points, baseline):
    """(length or None, description) where the line becomes faster than the baseline for good."""
    common = [(t, s / baseline[t]) for t, s in points if t in baseline]
    if not common:
        return None, "no common lengths"
    slower = [i for i, (_, ratio) in enumerate(common) if ratio >= 1.0]
    if not slower:
        return None, "below range"
    last = slower[-1]
    if last == len(common) - 1:
        return None, "never in range"
    (t0, r0), (t1, r1) = common[last], common[last + 1]
    frac = (0.0 - math.log(r0)) / (math.log(r1) - math.log(r0))
    length = math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    return length, f"{length:,.0f}"


def lines(rows):
    """The (mixer, impl) pairs in the order they were run."""
    seen = []
    for r in rows:
        if (r["mixer"], r["impl"]) not in seen:
            seen.append((r["mixer"], r["impl"]))
    return seen


def summarise(rows):
    """Per line: exponents, crossovers against softmax, fraction of matmul peak at its largest T."""
    summary = []
    baselines = {mode: baseline_times(rows, mode) for mode in MODES}
    for mixer, impl in lines(rows):
        entry = {"mixer": mixer, "impl": impl}
        for mode in MODES:
            points = series(rows, mixer, impl, mode)
            entry[f"exponent_{mode}"] = scaling_exponent(points)
            if mixer == BASELINE:
                entry[f"crossover_{mode}"], entry[f"crossover_{mode}_text"] = None, "baseline"
            else:
                entry[f"crossover_{mode}"], entry[f"crossover_{mode}_text"] = crossover(
                    points, baselines[mode]
                )
            measured = [
                r for r in rows if r["mixer"] == mixer and r["impl"] == impl and r[mode]["status"] == "ok"
            ]
            largest = max(measured, key=lambda r: r["T"], default=None)
            entry[f"peak_fraction_{mode}_at_max_T"] = (
                None if largest is None else largest[mode]["peak_fraction"]
            )
            entry[f"max_T_{mode}"] = None if largest is None else largest["T"]
        summary.append(entry)
    return summary


# ----------------------------------------------------------------------------- text


def _num(x, fmt, missing="-"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _cell(m, key, fmt, scale=1.0):
    if m["status"] != "ok":
        return m["status"]
    value = m.get(key)
    return _num(None if value is None else value * scale, fmt)


def results_table(rows):
    head = (
        "| mixer | impl | T | chunk | fwd ms | fwd+bwd ms | compile s fwd / bwd | memory MB fwd / bwd "
        "| page faults MiB/call fwd / bwd | GFLOP fwd | % peak fwd | % peak fwd+bwd | note |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, b = r["fwd"], r["fwd_bwd"]
        notes = "; ".join(n for n in (f.get("note"), b.get("note")) if n)
        compile_s = f"{_cell(f, 'compile_seconds', '.1f')} / {_cell(b, 'compile_seconds', '.1f')}"
        memory = f"{_cell(f, 'memory_bytes', '.1f', 1e-6)} / {_cell(b, 'memory_bytes', '.1f', 1e-6)}"
        faulted = " / ".join(_cell(m, "page_faults_per_call", ".1f", PAGE_MIB) for m in (f, b))
        out.append(
            f"| {r['mixer']} | {r['impl']} | {r['T']} | {r.get('chunk', '-')} | {_cell(f, 'seconds', '.2f', 1e3)} "
            f"| {_cell(b, 'seconds', '.2f', 1e3)} | {compile_s} | {memory} | {faulted} "
            f"| {_num(f['flops'] * 1e-9 if f.get('flops') is not None else None, '.3g')} "
            f"| {_cell(f, 'peak_fraction', '.1f', 100)} | {_cell(b, 'peak_fraction', '.1f', 100)} | {notes} |"
        )
    return "\n".join(out)


def summary_table(summary):
    head = (
        "| mixer | impl | exponent fwd | exponent fwd+bwd | faster than softmax from T (fwd) "
        "| ... (fwd+bwd) | % peak fwd @ max T | % peak fwd+bwd @ max T |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in summary:
        peaks = []
        for mode in MODES:
            frac = e[f"peak_fraction_{mode}_at_max_T"]
            peaks.append("-" if frac is None else f"{100 * frac:.1f} (T={e[f'max_T_{mode}']})")
        out.append(
            f"| {e['mixer']} | {e['impl']} | {_num(e['exponent_fwd'], '.2f')} "
            f"| {_num(e['exponent_fwd_bwd'], '.2f')} | {e['crossover_fwd_text']} "
            f"| {e['crossover_fwd_bwd_text']} | {peaks[0]} | {peaks[1]} |"
        )
    return "\n".join(out)


def markdown(result):
    cfg, peak = result["config"], result["matmul_peak"]
    parts = [
        "# Mixer benchmark",
        "",
        f"device `{cfg['device']}` ({cfg['backend']}), jax {cfg['jax_version']}, dtype {cfg['dtype']}, "
        f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} chunk={cfg['chunk_size'] or 'each op default (table)'}, "
        f"median of {cfg['repeats']} runs, memory budget {cfg['max_gb']} GB.",
        f"Matmul peak: {peak['n']}^3 {peak['dtype']} matmul, {peak['flops_per_second'] / 1e9:.1f} GFLOP/s.",
        "",
        results_table(result["rows"]),
        "",
        "## Summary",
        "",
        summary_table(result["summary"]),
    ]
    if result.get("preset_lines"):
        parts += ["", f"## Preset {cfg['preset']}", ""] + [f"* {line}" for line in result["preset_lines"]]
    if result["notes"]:
        parts += ["", "## Notes", ""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- plot


def plot(result, path):
    rows, summary = result["rows"], {(e["mixer"], e["impl"]): e for e in result["summary"]}
    mixers = list(dict.fromkeys(mixer for mixer, _ in lines(rows)))
    colours = {m: ("black" if m == BASELINE else plotting.colormap("tab10")(i % 10)) for i, m in enumerate(mixers)}
    impl_styles = {"chunk": "-", "reference": ":", "scan": "-.", "xla": "--"}
    fig, axes = plotting.figure(1, len(MODES), figsize=(14, 7), dpi=120, squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        for mixer, impl in lines(rows):
            points = series(rows, mixer, impl, mode)
            if not points:
                continue
            entry = summary[(mixer, impl)]
            slope = entry[f"exponent_{mode}"]
            label = f"{mixer}/{impl}" + ("" if slope is None else f"  p={slope:.2f}")
            if mixer != BASELINE and entry[f"crossover_{mode}"] is not None:
                label += f", < softmax from T~{entry[f'crossover_{mode}']:,.0f}"
            style = "--" if mixer == BASELINE and impl == "chunk" else impl_styles.get(impl, "-")
            ax.plot(*zip(*points), style, color=colours[mixer], marker="o", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("seconds (median)")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
        else:
            ax.text(0.5, 0.5, "nothing measured (see the table notes)", ha="center", transform=ax.transAxes)
    cfg = result["config"]
    fig.suptitle(
        f"mixers on {cfg['device']} ({cfg['dtype']}, B={cfg['batch']} H={cfg['heads']} "
        f"D={cfg['head_dim']}); p = fitted exponent of time vs T"
    )
    plotting.save(fig, path)
