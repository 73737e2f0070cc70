"""Benchmark of the sequence mixers: time, compile time, memory and FLOP efficiency against T.

    python -m experiments.bench.mixers [--mixers kda,ssd,...] [--impls chunk,reference,...]
        [--lengths 512,2048,8192,32768] [--batch B --heads H --head-dim D] [--dtype float32|bfloat16]
        [--repeats N] [--max-gb 8] [--out DIR] [--preset issue2|issue3]

For every mixer, impl and length it compiles the forward pass and the forward + backward pass (a VJP
of the output against a random cotangent, gradients to every input) with `jax.jit(...).lower().compile()`
and reports: the median wall time of `repeats` runs after a warm-up (block_until_ready), the compile
time, the compiled executable's memory (`memory_analysis()`: temp + argument + output bytes), the
analytic FLOP count (formulas in `mixer_specs`) and the achieved FLOP/s as a fraction of the peak of a
large matmul timed in the same run, same device and dtype. Softmax attention runs as the quadratic
baseline (impls `--softmax-impls`, default its O(T)-memory "chunk" flash form). A configuration whose
estimated or compiled memory exceeds `--max-gb` is skipped with a note; failures are caught per row.

Writes DIR/<stem>.md (tables), DIR/<stem>.json (everything) and DIR/<stem>.png (time vs T, log-log,
with the fitted exponents), stem = "mixers" or "mixers_<preset>"; see experiments/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from experiments.bench import mixer_specs, report
from experiments.bench.cost_models import BACKWARD_FLOP_FACTOR, Dims
from hybrid_jax.ops._common import Impl

DEFAULTS = {
    "mixers": "linear_attention,gla,delta_rule,gated_delta_rule,kda,ssd,selective_scan,log_linear",
    "impls": "chunk",
    "softmax_impls": "chunk",
    "lengths": "512,2048,8192,32768",
    "batch": 1,
    "heads": 4,
    "head_dim": 64,
    "dtype": "float32",
    "repeats": 3,
    "max_gb": 8.0,
    "chunk_size": 64,
    "matmul_size": 2048,
    "out": "experiments/bench/results",
}
PRESETS = {
    # Issue 2: the chunked GLA / SSD against their token recurrences, forward + backward at T = 4096.
    "issue2": {"mixers": "gla,ssd", "impls": "reference,chunk", "lengths": "4096"},
    # Issue 3: KDA's three algorithms; chunk must scale linearly and beat the recurrence.
    "issue3": {
        "mixers": "kda",
        "impls": "reference,scan,chunk",
        "lengths": "1024,4096,16384",
        "batch": 1,
        "heads": 4,
        "head_dim": 64,
    },
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.mixers", description=__doc__.split("\n")[0]
    )
    arg = parser.add_argument
    arg("--preset", choices=sorted(PRESETS), help="a named configuration (explicit flags still win)")
    arg("--mixers", help=f"comma-separated, from {sorted(mixer_specs.REGISTRY) + ['log_linear']}")
    arg("--impls", help="comma-separated impls of the linear mixers: reference, scan, chunk, pallas, auto "
        "(each mixer runs those it supports)")
    arg("--softmax-impls", help="impls of the softmax baseline (reference, chunk, xla)")
    arg("--lengths", help="comma-separated sequence lengths T")
    arg("--batch", type=int)
    arg("--heads", type=int)
    arg("--head-dim", type=int)
    arg("--dtype", choices=sorted(DTYPES))
    arg("--repeats", type=int, help="timed runs per measurement (median reported)")
    arg("--max-gb", type=float, help="memory budget: larger configurations are skipped")
    arg("--chunk-size", type=int)
    arg("--matmul-size", type=int, help="n of the n^3 matmul that measures the peak")
    arg("--out", help="output directory")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    return validate(parser, args)


def _csv(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def validate(parser, args):
    args.mixers = _csv(args.mixers)
    args.impls = _csv(args.impls)
    args.softmax_impls = _csv(args.softmax_impls)
    known = set(mixer_specs.REGISTRY) | set(mixer_specs.OPTIONAL)
    for name in args.mixers:
        if name not in known:
            parser.error(f"--mixers: unknown mixer {name!r}; valid choices are {sorted(known)}")
    linear_impls = set().union(*(s.impls for s in mixer_specs.REGISTRY.values() if not s.quadratic))
    valid_impls = [impl.value for impl in Impl if impl.value in linear_impls]  # in Impl's order
    for flag, chosen, valid in (
        ("--impls", args.impls, valid_impls),
        ("--softmax-impls", args.softmax_impls, mixer_specs.REGISTRY["softmax"].impls),
    ):
        bad = [i for i in chosen if i not in valid]
        if bad or not chosen:
            parser.error(f"{flag}: got {chosen}; valid choices are {list(valid)}")
    try:
        args.lengths = sorted({int(t) for t in _csv(args.lengths)})
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    for name in ("batch", "heads", "head_dim", "repeats", "chunk_size", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lengths or args.lengths[0] < 1:
        parser.error(f"--lengths must be positive integers, got {args.lengths}")
    if args.max_gb <= 0:
        parser.error(f"--max-gb must be > 0, got {args.max_gb}")
    return args


# ----------------------------------------------------------------------------- measuring


def compiled_bytes(compiled):
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def time_compiled(compiled, args, repeats):
    jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations are not the steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def measure_matmul_peak(n, dtype, repeats):
    """FLOP/s of an n x n x n matmul in `dtype`: the peak the mixers are compared against."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    seconds = min(time_compiled(compiled, (a, b), max(repeats, 3)))  # the peak: best of the runs
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "seconds": seconds,
        "flops_per_second": 2 * n**3 / seconds,
    }


def _short_error(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:160]}"


def measure(spec, impl, dims, dtype, args, peak):
    """One table row: forward and forward + backward measurements of (mixer, impl, T)."""
    row = {"mixer": spec.name, "impl": impl, "T": dims.time}
    budget = args.max_gb * 1e9
    key = jax.random.key(dims.time)
    inputs = None
    algorithm = mixer_specs.algorithm(impl)
    forward_flops = spec.flops(dims, algorithm)
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        flops = None if forward_flops is None else forward_flops * (BACKWARD_FLOP_FACTOR if backward else 1)
        entry = {"status": "ok", "note": "", "flops": flops}
        row[mode] = entry
        estimate = spec.estimate_bytes(dims, algorithm, backward)
        if estimate > budget:
            entry.update(
                status="skipped", note=f"{mode}: est. {estimate / 1e9:.1f} GB > {args.max_gb:g} GB budget"
            )
            continue
        try:
            if inputs is None:
                inputs = spec.make_inputs(key, dims, dtype)

            def forward(*xs):
                return spec.apply(impl, dims.chunk_size, *xs)

            if backward:
                out = jax.eval_shape(forward, *inputs)
                cotangent = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(out.dtype)
                fn, call_args = (lambda ct, *xs: jax.vjp(forward, *xs)[1](ct)), (cotangent, *inputs)
            else:
                fn, call_args = forward, inputs
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*call_args).compile()
            entry["compile_seconds"] = time.perf_counter() - start
            entry["memory_bytes"] = compiled_bytes(compiled)
            if entry["memory_bytes"] is not None and entry["memory_bytes"] > budget:
                entry.update(
                    status="skipped",
                    note=f"{mode}: compiled {entry['memory_bytes'] / 1e9:.1f} GB > {args.max_gb:g} GB budget",
                )
                continue
            times = time_compiled(compiled, call_args, args.repeats)
            entry.update(seconds=statistics.median(times), min_seconds=min(times))
            if flops is not None:
                entry["flops_per_second"] = flops / entry["seconds"]
                entry["peak_fraction"] = entry["flops_per_second"] / peak["flops_per_second"]
        except Exception as err:  # noqa: BLE001 -- one failing configuration must not end the sweep
            entry.update(status="failed", note=f"{mode}: {_short_error(err)}")
            traceback.print_exc(file=sys.stderr)
    return row


def mixer_plan(args):
    """[(spec, impls)] to run, softmax last; plus notes about mixers that cannot run."""
    plan, notes = [], []
    for name in args.mixers:
        if name == "softmax":
            continue
        if name in mixer_specs.OPTIONAL:
            spec, why = mixer_specs.log_linear_spec()
            if spec is None:
                notes.append(why)
                continue
        else:
            spec = mixer_specs.REGISTRY[name]
        impls = [i for i in args.impls if i in spec.impls]
        if not impls:
            notes.append(f"{name} skipped: it supports none of --impls {args.impls} (it has {list(spec.impls)})")
            continue
        plan.append((spec, impls))
    plan.append((mixer_specs.REGISTRY["softmax"], args.softmax_impls))
    return plan, notes


def preset_lines(args, rows):
    """The figures an issue asks for, as sentences."""

    def seconds(mixer, impl, t, mode="fwd_bwd"):
        for r in rows:
            if (r["mixer"], r["impl"], r["T"]) == (mixer, impl, t) and r[mode]["status"] == "ok":
                return r[mode]["seconds"]
        return None

    lines = []
    if args.preset == "issue2":
        for mixer in ("gla", "ssd"):
            for mode in report.MODES:
                ref, chunk = seconds(mixer, "reference", 4096, mode), seconds(mixer, "chunk", 4096, mode)
                if ref and chunk:
                    lines.append(
                        f"{mixer} {report.MODE_TITLES[mode]} at T=4096: speedup chunk / reference = "
                        f"{ref / chunk:.2f}x ({chunk * 1e3:.1f} ms vs {ref * 1e3:.1f} ms)"
                    )
                else:
                    lines.append(f"{mixer} {report.MODE_TITLES[mode]} at T=4096: not measured (see table)")
    if args.preset == "issue3":
        for mode in report.MODES:
            short, long_ = seconds("kda", "chunk", 1024, mode), seconds("kda", "chunk", 16384, mode)
            if short and long_:
                lines.append(
                    f"kda chunk {report.MODE_TITLES[mode]}: time(16384) / time(1024) = "
                    f"{long_ / short:.1f} (16 is linear, 256 quadratic)"
                )
            ref, chunk = seconds("kda", "reference", 4096, mode), seconds("kda", "chunk", 4096, mode)
            if ref and chunk:
                lines.append(
                    f"kda {report.MODE_TITLES[mode]} at T=4096: speedup chunk / reference = "
                    f"{ref / chunk:.2f}x ({chunk * 1e3:.1f} ms vs {ref * 1e3:.1f} ms)"
                )
        skipped = [
            f"T={r['T']} {m}"
            for r in rows
            if r["mixer"] == "kda" and r["impl"] == "scan"
            for m in report.MODES
            if r[m]["status"] != "ok"
        ]
        if skipped:
            lines.append(
                "kda scan not measured at " + ", ".join(skipped) + ": it materialises a K x K "
                "transition per token (see the notes column)"
            )
    return lines


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    device = jax.devices()[0]
    peak = measure_matmul_peak(args.matmul_size, dtype, args.repeats)
    print(
        f"matmul peak: {peak['flops_per_second'] / 1e9:.1f} GFLOP/s ({peak['n']}^3 {peak['dtype']})",
        flush=True,
    )
    plan, notes = mixer_plan(args)
    rows = []
    for spec, impls in plan:
        for impl in impls:
            for t in args.lengths:
                dims = Dims(args.batch, t, args.heads, args.head_dim, args.chunk_size)
                row = measure(spec, impl, dims, dtype, args, peak)
                rows.append(row)
                status = {
                    m: (f"{row[m]['seconds'] * 1e3:.2f} ms" if row[m]["status"] == "ok" else row[m]["status"])
                    for m in report.MODES
                }
                print(
                    f"  {spec.name:>18s} {impl:>9s} T={t:<6d} fwd {status['fwd']:>12s}  "
                    f"fwd+bwd {status['fwd_bwd']:>12s}",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "config": {
            "preset": args.preset,
            "mixers": args.mixers,
            "impls": args.impls,
            "softmax_impls": args.softmax_impls,
            "lengths": args.lengths,
            "batch": args.batch,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "max_gb": args.max_gb,
            "chunk_size": args.chunk_size,
            "device": device.device_kind,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "backward_flop_factor": BACKWARD_FLOP_FACTOR,
        },
        "matmul_peak": peak,
        "rows": rows,
        "summary": report.summarise(rows),
        "notes": notes,
        "preset_lines": preset_lines(args, rows),
    }
    text = report.markdown(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "mixers" if args.preset is None else f"mixers_{args.preset}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    report.plot(result, stem + ".png")
    print(f"wrote {stem}.md, {stem}.json, {stem}.png")
    return result


if __name__ == "__main__":
    main()
