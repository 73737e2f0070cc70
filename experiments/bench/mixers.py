"""Benchmark of the sequence mixers: time, compile time, memory and FLOP efficiency against T.

    python -m experiments.bench.mixers [--mixers kda,ssd,...] [--impls chunk,reference,...]
        [--lengths 512,2048,8192,32768] [--batch B --heads H --head-dim D] [--dtype float32|bfloat16]
        [--repeats N] [--max-gb 8] [--extra-runs MIXER:IMPL:T,...] [--out DIR] [--preset issue2|issue3|issue14]

For every mixer, impl and length it compiles the forward pass and the forward + backward pass (a VJP
of the output against a random cotangent, gradients to every input) with `jax.jit(...).lower().compile()`
and reports: the median wall time of `repeats` runs after a warm-up (block_until_ready), the compile
time, the compiled executable's memory (`memory_analysis()`: temp + argument + output bytes), the
analytic FLOP count (formulas in `mixer_specs`) and the achieved FLOP/s as a fraction of the peak of a
large matmul timed in the same run, same device and dtype. Softmax attention runs as the quadratic
baseline (impls `--softmax-impls`, default its O(T)-memory "chunk" flash form). A configuration whose
estimated or compiled memory exceeds `--max-gb` is skipped with a note; failures are caught per row.
`--extra-runs` adds single measurements outside the mixers x impls x lengths grid (e.g. a slow
reference at one length); the presets (`experiments.bench.presets`) use it.

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

from experiments.bench import host_memory, mixer_specs, report
from experiments.bench.cost_models import BACKWARD_FLOP_FACTOR, Dims
from experiments.bench.presets import PRESETS, preset_lines
from hybrid_jax.ops._common import Impl

DEFAULTS = {
    "mixers": "linear_attention,gla,delta_rule,gated_delta_rule,kda,kda_safe,ssd,selective_scan,log_linear",
    "impls": "chunk",
    "extra_runs": "",
    "softmax_impls": "chunk",
    "lengths": "512,2048,8192,32768",
    "batch": 1,
    "heads": 4,
    "head_dim": 64,
    "dtype": "float32",
    "repeats": 3,
    "max_gb": 8.0,
    "chunk_size": None,  # each op's default on this backend (`MixerSpec.chunk_size`)
    "matmul_size": 2048,
    "out": "experiments/bench/results",
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
    arg("--extra-runs", help="comma-separated MIXER:IMPL:T measurements beyond the grid, e.g. kda:reference:4096")
    arg("--chunk-size", type=int, help="chunk length of every chunked mixer (default: each op's own default "
        "on this backend, 32 for the delta rule family on CPU and 64 otherwise)")
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
    args.extra_runs = [_extra_run(parser, item, known) for item in _csv(args.extra_runs)]
    for name in ("batch", "heads", "head_dim", "repeats", "chunk_size", "matmul_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lengths or args.lengths[0] < 1:
        parser.error(f"--lengths must be positive integers, got {args.lengths}")
    if args.max_gb <= 0:
        parser.error(f"--max-gb must be > 0, got {args.max_gb}")
    return args


def _extra_run(parser, item, known):
    """`MIXER:IMPL:T` -> (mixer, impl, T), or a parser error naming what is wrong."""
    parts = item.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        parser.error(f"--extra-runs: {item!r} must be MIXER:IMPL:T with T a positive integer")
    mixer, impl, t = parts[0], parts[1], int(parts[2])
    if mixer not in known or mixer == "softmax":
        parser.error(f"--extra-runs: unknown mixer {mixer!r}; valid choices are {sorted(known - {'softmax'})}")
    impls = mixer_specs.REGISTRY[mixer].impls if mixer in mixer_specs.REGISTRY else None
    if impls is not None and impl not in impls:
        parser.error(f"--extra-runs: {mixer} has no impl {impl!r}; it has {list(impls)}")
    return mixer, impl, t


# ----------------------------------------------------------------------------- measuring


def compiled_bytes(compiled):
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def time_compiled(compiled, args, repeats):
    """(wall seconds of each of `repeats` calls after a warm-up, minor page faults per call)."""
    jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations are not the steady state
    times, faults = [], host_memory.minor_page_faults()
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times, (host_memory.minor_page_faults() - faults) / repeats


def measure_matmul_peak(n, dtype, repeats):
    """FLOP/s of an n x n x n matmul in `dtype`: the peak the mixers are compared against."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    seconds = min(time_compiled(compiled, (a, b), max(repeats, 3))[0])  # the peak: best of the runs
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
    row = {"mixer": spec.name, "impl": impl, "T": dims.time, "chunk": dims.chunk_size}
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
            times, faults = time_compiled(compiled, call_args, args.repeats)
            entry.update(seconds=statistics.median(times), min_seconds=min(times), page_faults_per_call=faults)
            if flops is not None:
                entry["flops_per_second"] = flops / entry["seconds"]
                entry["peak_fraction"] = entry["flops_per_second"] / peak["flops_per_second"]
        except Exception as err:  # noqa: BLE001 -- one failing configuration must not end the sweep
            entry.update(status="failed", note=f"{mode}: {_short_error(err)}")
            traceback.print_exc(file=sys.stderr)
    return row


def _spec(name, notes):
    """The MixerSpec of `name`, or None with a note when an optional mixer cannot run."""
    if name not in mixer_specs.OPTIONAL:
        return mixer_specs.REGISTRY[name]
    spec, why = mixer_specs.log_linear_spec()
    if spec is None and why not in notes:
        notes.append(why)
    return spec


def mixer_plan(args):
    """[(spec, impl, lengths)] to run: the grid, then the extra runs, softmax last; plus notes about
    mixers that cannot run."""
    plan, notes = [], []
    for name in args.mixers:
        spec = None if name == "softmax" else _spec(name, notes)
        if spec is None:
            continue
        impls = [i for i in args.impls if i in spec.impls]
        if not impls:
            notes.append(f"{name} skipped: it supports none of --impls {args.impls} (it has {list(spec.impls)})")
        plan += [(spec, impl, args.lengths) for impl in impls]
    for name, impl, t in args.extra_runs:
        spec = _spec(name, notes)
        if spec is not None and impl not in spec.impls:
            notes.append(f"{name}:{impl}:{t} skipped: {name} has no impl {impl!r} (it has {list(spec.impls)})")
        elif spec is not None:
            plan.append((spec, impl, [t]))
    plan += [(mixer_specs.REGISTRY["softmax"], impl, args.lengths) for impl in args.softmax_impls]
    return plan, notes


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
    advice = host_memory.huge_page_advice()
    if advice:
        print(f"note: {advice}", file=sys.stderr, flush=True)
        notes.append(advice)
    rows = []
    total, start = sum(len(lengths) for _, _, lengths in plan), time.perf_counter()
    for spec, impl, lengths in plan:
        for t in lengths:
            dims = Dims(args.batch, t, args.heads, args.head_dim, spec.chunk_size(args.chunk_size))
            row = measure(spec, impl, dims, dtype, args, peak)
            rows.append(row)
            status = {
                m: (f"{row[m]['seconds'] * 1e3:.2f} ms" if row[m]["status"] == "ok" else row[m]["status"])
                for m in report.MODES
            }
            elapsed = time.perf_counter() - start
            print(
                f"  [{len(rows)}/{total}, {elapsed:.0f} s] {spec.name:>18s} {impl:>9s} T={t:<6d} "
                f"fwd {status['fwd']:>12s}  fwd+bwd {status['fwd_bwd']:>12s}",
                file=sys.stderr,
                flush=True,
            )
    summary = report.summarise(rows)
    result = {
        "config": {
            "preset": args.preset,
            "mixers": args.mixers,
            "impls": args.impls,
            "softmax_impls": args.softmax_impls,
            "lengths": args.lengths,
            "extra_runs": [":".join(map(str, run)) for run in args.extra_runs],
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
            "transparent_huge_pages": host_memory.transparent_huge_page_mode(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        },
        "matmul_peak": peak,
        "rows": rows,
        "summary": summary,
        "notes": notes,
        "preset_lines": preset_lines(args.preset, rows, summary),
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
