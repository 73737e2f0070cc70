"""The mixer benchmark's presets: the configuration each issue asked for, and the sentences that
report its figures (`python -m experiments.bench.mixers --preset NAME`; explicit flags still win).

* issue2: GLA and SSD, chunk against the token recurrence, at T = 4096.
* issue3: KDA's reference, scan and chunk forms at T = 1024, 4096, 16384.
* issue14: safe-gate KDA (`kda_safe`, chunk) against its token recurrence at T = 4096, its forward's
  fraction of the matmul peak at T = 8192, and the scaling exponent of every chunked mixer over
  T = 1024 .. 16384 (forward + backward), with the goals the issue set.
"""
from __future__ import annotations

from experiments.bench import report

ISSUE14_GOALS = {"speedup": 5.0, "peak_fraction": 0.25, "exponent": 1.1}

PRESETS = {
    "issue2": {"mixers": "gla,ssd", "impls": "reference,chunk", "lengths": "4096"},
    "issue3": {
        "mixers": "kda",
        "impls": "reference,scan,chunk",
        "lengths": "1024,4096,16384",
        "batch": 1,
        "heads": 4,
        "head_dim": 64,
    },
    "issue14": {
        "mixers": "linear_attention,gla,delta_rule,gated_delta_rule,kda,kda_safe,ssd,selective_scan,rg_lru,"
                  "log_linear",
        "impls": "chunk",
        "lengths": "1024,2048,4096,8192,16384",
        "extra_runs": "kda_safe:reference:4096",
        "batch": 1,
        "heads": 4,
        "head_dim": 64,
        "dtype": "float32",
    },
}


def _seconds(rows, mixer, impl, t, mode="fwd_bwd"):
    for r in rows:
        if (r["mixer"], r["impl"], r["T"]) == (mixer, impl, t) and r[mode]["status"] == "ok":
            return r[mode]["seconds"]
    return None


def _speedup_line(rows, mixer, t, mode, goal=None):
    ref, chunk = _seconds(rows, mixer, "reference", t, mode), _seconds(rows, mixer, "chunk", t, mode)
    title = f"{mixer} {report.MODE_TITLES[mode]} at T={t}"
    if not (ref and chunk):
        return f"{title}: not measured (see table)"
    target = "" if goal is None else f"; goal >= {goal:g}x: {'met' if ref / chunk >= goal else 'NOT met'}"
    return (f"{title}: speedup chunk / reference = {ref / chunk:.2f}x "
            f"({chunk * 1e3:.1f} ms vs {ref * 1e3:.1f} ms{target})")


def _issue2(rows, summary):
    return [_speedup_line(rows, mixer, 4096, mode) for mixer in ("gla", "ssd") for mode in report.MODES]


def _issue3(rows, summary):
    lines = []
    for mode in report.MODES:
        short, long_ = _seconds(rows, "kda", "chunk", 1024, mode), _seconds(rows, "kda", "chunk", 16384, mode)
        if short and long_:
            lines.append(f"kda chunk {report.MODE_TITLES[mode]}: time(16384) / time(1024) = "
                         f"{long_ / short:.1f} (16 is linear, 256 quadratic)")
        lines.append(_speedup_line(rows, "kda", 4096, mode))
    skipped = [f"T={r['T']} {m}" for r in rows if r["mixer"] == "kda" and r["impl"] == "scan"
               for m in report.MODES if r[m]["status"] != "ok"]
    if skipped:
        lines.append("kda scan not measured at " + ", ".join(skipped) + ": it materialises a K x K "
                     "transition per token (see the notes column)")
    return lines


def _peak_line(rows, mixer, t, goal):
    for r in rows:
        if (r["mixer"], r["impl"], r["T"]) == (mixer, "chunk", t) and r["fwd"]["status"] == "ok":
            fraction = r["fwd"].get("peak_fraction")
            if fraction is not None:
                verdict = "met" if fraction >= goal else "NOT met"
                return (f"{mixer} chunk forward at T={t}: {100 * fraction:.1f}% of the matmul peak "
                        f"(goal >= {100 * goal:.0f}%: {verdict})")
    return f"{mixer} chunk forward at T={t}: not measured (see table)"


def _issue14(rows, summary):
    goals = ISSUE14_GOALS
    lines = [_speedup_line(rows, "kda_safe", 4096, "fwd_bwd", goals["speedup"]),
             _peak_line(rows, "kda_safe", 8192, goals["peak_fraction"]),
             _peak_line(rows, "kda", 8192, goals["peak_fraction"])]
    exponents = [(e["mixer"], e["exponent_fwd_bwd"]) for e in summary
                 if e["impl"] == "chunk" and e["mixer"] != report.BASELINE and e["exponent_fwd_bwd"] is not None]
    if exponents:
        above = [m for m, p in exponents if p > goals["exponent"]]
        verdict = "met by all" if not above else "NOT met by " + ", ".join(above)
        listed = ", ".join(f"{m} {p:.2f}" for m, p in exponents)
        lines.append(f"scaling exponent, forward + backward, chunk: {listed} (goal <= {goals['exponent']}: {verdict})")
    else:
        lines.append("scaling exponents: fewer than two lengths measured per mixer (see table)")
    return lines


_LINES = {"issue2": _issue2, "issue3": _issue3, "issue14": _issue14}


def preset_lines(preset: str | None, rows: list, summary: list) -> list[str]:
    """The figures preset `preset` asks for, as sentences ([] without a preset)."""
    return [] if preset is None else _LINES[preset](rows, summary)
