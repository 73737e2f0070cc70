"""The mixer benchmark runs end to end at tiny sizes, and its analysis gets known answers right."""
import json
import math
import sys

import pytest

from experiments.bench import host_memory, mixers, presets, report


def test_main_writes_table_json_and_plot(tmp_path):
    result = mixers.main(["--mixers", "gated_delta_rule,ssd", "--lengths", "32,64", "--repeats", "1",
                          "--matmul-size", "128", "--out", str(tmp_path)])
    for suffix in ("md", "json", "png"):
        assert (tmp_path / f"mixers.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "mixers.json").read_text())
    assert set(data) >= {"config", "matmul_peak", "rows", "summary", "notes"}
    assert data["matmul_peak"]["flops_per_second"] > 0
    lines = {(r["mixer"], r["impl"], r["T"]) for r in data["rows"]}
    assert lines == {(m, "chunk", t) for m in ("gated_delta_rule", "ssd", "softmax") for t in (32, 64)}
    for row in data["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            m = row[mode]
            assert m["status"] == "ok", m
            assert m["seconds"] > 0 and m["compile_seconds"] > 0 and m["memory_bytes"] > 0
            assert m["page_faults_per_call"] >= 0
            assert m["flops"] > 0 and 0 < m["peak_fraction"]
    summary = {(e["mixer"], e["impl"]): e for e in data["summary"]}
    assert set(summary) == {("gated_delta_rule", "chunk"), ("ssd", "chunk"), ("softmax", "chunk")}
    for entry in summary.values():
        assert math.isfinite(entry["exponent_fwd"]) and math.isfinite(entry["exponent_fwd_bwd"])
        assert entry["max_T_fwd"] == 64
    assert summary[("softmax", "chunk")]["crossover_fwd_text"] == "baseline"
    text = (tmp_path / "mixers.md").read_text()
    # Each op at its own default chunk on this backend (the tests run on CPU): the delta family at 32.
    assert {r["mixer"]: r["chunk"] for r in data["rows"]} == {"gated_delta_rule": 32, "ssd": 64, "softmax": 64}
    assert "| gated_delta_rule | chunk | 64 | 32 |" in text and "## Summary" in text
    assert result["rows"] == data["rows"]


def test_chunk_size_flag_overrides_each_default():
    args = mixers.parse_args(["--chunk-size", "16"])
    specs = {spec.name: spec for spec, _, _ in mixers.mixer_plan(args)[0]}
    assert {spec.chunk_size(args.chunk_size) for spec in specs.values()} == {16}
    assert mixers.parse_args([]).chunk_size is None
    assert specs["kda_safe"].chunk_size(None) == 32 and specs["gla"].chunk_size(None) == 64


def test_budget_skips_and_bad_flags(tmp_path):
    # A 1 kB budget is below every estimate: all rows are skipped with a note, nothing is compiled.
    data = mixers.main(["--mixers", "kda", "--impls", "scan", "--lengths", "16", "--repeats", "1",
                        "--matmul-size", "64", "--max-gb", "1e-6", "--out", str(tmp_path)])
    for row in data["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            assert row[mode]["status"] == "skipped" and "budget" in row[mode]["note"]
    for argv in (["--mixers", "kdaa"], ["--impls", "bogus"], ["--softmax-impls", "scan"], ["--lengths", "12,x"],
                 ["--extra-runs", "kda:reference"], ["--extra-runs", "kda:bogus:64"], ["--extra-runs", "nope:chunk:64"],
                 ["--extra-runs", "kda:chunk:0"]):
        with pytest.raises(SystemExit):
            mixers.parse_args(argv)


def test_issue14_preset_plan():
    """The grid of every chunked mixer (kda_safe included) at T = 1K..16K, plus one reference run."""
    args = mixers.parse_args(["--preset", "issue14"])
    plan, _ = mixers.mixer_plan(args)
    runs = [(spec.name, impl, tuple(lengths)) for spec, impl, lengths in plan]
    grid = (1024, 2048, 4096, 8192, 16384)
    assert ("kda_safe", "chunk", grid) in runs and ("kda_safe", "reference", (4096,)) in runs
    assert runs[-1] == ("softmax", "chunk", grid)
    assert (args.batch, args.heads, args.head_dim, args.dtype) == (1, 4, 64, "float32")
    # an explicit flag still wins over the preset
    assert mixers.parse_args(["--preset", "issue14", "--extra-runs", "gla:reference:64"]).extra_runs == [
        ("gla", "reference", 64)]


def _rows(times):
    """Rows shaped like the benchmark's from {(mixer, T): seconds}."""
    return [{"mixer": m, "impl": "chunk", "T": t, "fwd": {"status": "ok", "seconds": s, "peak_fraction": 0.5},
             "fwd_bwd": {"status": "skipped"}} for (m, t), s in times.items()]


def test_issue14_preset_lines_on_known_rows():
    ok = lambda seconds, fraction=None: {"status": "ok", "seconds": seconds, "peak_fraction": fraction}  # noqa: E731
    rows = [{"mixer": "kda_safe", "impl": "reference", "T": 4096, "fwd": ok(1.0), "fwd_bwd": ok(3.0)},
            {"mixer": "kda_safe", "impl": "chunk", "T": 4096, "fwd": ok(0.1), "fwd_bwd": ok(0.5)},
            {"mixer": "kda_safe", "impl": "chunk", "T": 8192, "fwd": ok(0.2, 0.3), "fwd_bwd": ok(1.0)},
            {"mixer": "kda", "impl": "chunk", "T": 8192, "fwd": ok(0.4, 0.1), "fwd_bwd": ok(2.0)}]
    summary = [{"mixer": "kda_safe", "impl": "chunk", "exponent_fwd_bwd": 1.0},
               {"mixer": "gla", "impl": "chunk", "exponent_fwd_bwd": 1.25},
               {"mixer": "softmax", "impl": "chunk", "exponent_fwd_bwd": 2.0}]
    speedup, safe_peak, kda_peak, exponents = presets.preset_lines("issue14", rows, summary)
    assert "6.00x" in speedup and "NOT met" not in speedup and "met" in speedup
    assert "30.0% of the matmul peak" in safe_peak and "NOT met" not in safe_peak
    assert "10.0% of the matmul peak" in kda_peak and "NOT met" in kda_peak
    assert "kda_safe 1.00, gla 1.25" in exponents and "NOT met by gla" in exponents and "softmax" not in exponents
    assert presets.preset_lines(None, rows, summary) == []


def test_exponent_and_crossover_on_known_curves():
    lengths = (256, 1024, 4096, 16384)
    # softmax ~ T^2 / 1e6, linear ~ T / 1e3: equal at T = 1000, between the measured 256 and 1024.
    rows = _rows({**{("softmax", t): t * t * 1e-6 for t in lengths}, **{("lin", t): t * 1e-3 for t in lengths}})
    summary = {e["mixer"]: e for e in report.summarise(rows)}
    assert summary["softmax"]["exponent_fwd"] == pytest.approx(2.0, rel=1e-9)
    assert summary["lin"]["exponent_fwd"] == pytest.approx(1.0, rel=1e-9)
    assert summary["lin"]["crossover_fwd"] == pytest.approx(1000.0, rel=1e-9)
    assert summary["lin"]["exponent_fwd_bwd"] is None and summary["lin"]["crossover_fwd_bwd_text"] == "no common lengths"
    baseline = {t: t * t * 1e-6 for t in lengths}
    assert report.crossover([(t, 1e6) for t in lengths], baseline)[1] == "never in range"
    assert report.crossover([(t, 1e-9) for t in lengths], baseline)[1] == "below range"


def test_huge_page_advice(tmp_path):
    """The note says when malloc's large blocks are page-faulted on every call, and only then."""
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_page_mode(str(mode_file)) == "madvise"
    assert host_memory.transparent_huge_page_mode(str(tmp_path / "missing")) is None
    assert host_memory.malloc_uses_huge_pages("glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1")
    assert not host_memory.malloc_uses_huge_pages("glibc.malloc.hugetlb=0")
    assert not host_memory.malloc_uses_huge_pages(None)
    if not sys.platform.startswith("linux"):
        return
    steady = host_memory.STEADY_MALLOC_TUNABLES
    assert host_memory.malloc_keeps_freed_memory(steady)
    assert not host_memory.malloc_keeps_freed_memory("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1")
    without_huge_pages = steady.replace("glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=0")
    assert host_memory.huge_page_advice("madvise", steady) is None
    assert host_memory.huge_page_advice("always", without_huge_pages) is None
    assert "hugetlb is not set" in host_memory.huge_page_advice("madvise", without_huge_pages)
    assert "trim" in host_memory.huge_page_advice("madvise", "glibc.malloc.hugetlb=1")
    assert "trim" in host_memory.huge_page_advice("always", "")
    assert f"GLIBC_TUNABLES={steady}" in host_memory.huge_page_advice("madvise", "")
    assert "never" in host_memory.huge_page_advice("never", steady)
