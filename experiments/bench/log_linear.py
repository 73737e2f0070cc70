"""Benchmark: chunked log-linear attention (Fenwick levels) against its plain gated-delta counterpart.

    python -m experiments.bench.log_linear [--lengths 1024,4096,16384] [--mixers gdn,kda]
        [--batch 1] [--heads 4] [--head-dim 64] [--chunk-size 64] [--repeats 7] [--clock wall|cpu]

For each mixer (log-linear Gated DeltaNet with a scalar gate, log-linear KDA with a per-channel gate)
and each T it times the jitted forward + backward pass (gradients to q, k, v, g, beta and, for the
log-linear op, the level scales) with impl="chunk": the median (and the minimum) of `repeats` runs
after a compiling warm-up run, each ended by block_until_ready (wall clock, or with --clock cpu the
process CPU time, which a busy shared host disturbs less). It prints the log-linear time, the
plain `gated_delta_rule` / `kda` time at the same T, their ratio, and the growth
time(T_max) / time(T_min) of both against the expectations T_max / T_min (linear) and
T_max / T_min * log2(T_max / C) / log2(T_min / C) (T log T).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp

from hybrid_jax import ops
from hybrid_jax.ops import log_linear

MIXERS = {"gdn": (ops.gated_delta_rule, False), "kda": (ops.kda, True)}  # name -> (plain op, per-channel g)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.log_linear",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths T")
    parser.add_argument("--mixers", default="gdn,kda", help=f"comma-separated, from {sorted(MIXERS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the process CPU time (all threads) on a shared, loaded host")
    args = parser.parse_args(argv)
    args.lengths = [int(t) for t in args.lengths.split(",")]
    args.mixers = args.mixers.split(",")
    unknown = sorted(set(args.mixers) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; valid choices are {sorted(MIXERS)}")
    return args


def make_inputs(key, batch, time_steps, heads, dim, per_channel):
    kq, kk, kv, kg, kb, kl = jax.random.split(key, 6)
    shape = (batch, time_steps, heads, dim)
    k = jax.random.normal(kk, shape)
    gate_shape = shape if per_channel else shape[:3]
    return dict(
        q=jax.random.normal(kq, shape),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(kv, shape),
        g=-0.1 * jax.nn.softplus(jax.random.normal(kg, gate_shape)),
        beta=jax.nn.sigmoid(jax.random.normal(kb, shape[:3])),
        level_scales=1.0 + 0.1 * jax.random.normal(kl, shape[:3] + (log_linear.num_levels(time_steps),)),
    )


def forward_backward(op, chunk_size):
    """jit of the gradient of <o, cotangent> with respect to every floating input."""

    def loss(inputs, cotangent):
        inputs = dict(inputs)
        o, _ = op(inputs.pop("q"), inputs.pop("k"), inputs.pop("v"), **inputs, impl="chunk",
                  chunk_size=chunk_size)
        return jnp.sum(o * cotangent)

    return jax.jit(jax.grad(loss))


def run_times(calls, repeats, clock):
    """Per call (fn, args): (median, min) seconds of `repeats` runs after a compiling warm-up run. The
    calls take turns, so that a drifting load on the host hits them alike."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), record in zip(calls, times):
            start = clock()
            jax.block_until_ready(fn(*args))
            record.append(clock() - start)
    return [(statistics.median(record), min(record)) for record in times]


def main(argv=None):
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), B={args.batch} "
          f"H={args.heads} K=V={args.head_dim} C={args.chunk_size} float32, forward + backward, "
          f"{args.clock} clock, median of {args.repeats}")
    columns = ("mixer", "T", "log-linear ms", "(min)", "plain ms", "(min)", "ratio")
    widths = (8, 8, 15, 10, 11, 10, 8)
    header = "".join(f"{c:{'<' if i == 0 else '>'}{w}}" for i, (c, w) in enumerate(zip(columns, widths)))
    print(header)
    print("-" * len(header))
    results = {}
    for name in args.mixers:
        plain_op, per_channel = MIXERS[name]
        for t in args.lengths:
            inputs = make_inputs(jax.random.PRNGKey(t), args.batch, t, args.heads, args.head_dim, per_channel)
            cotangent = jax.random.normal(jax.random.PRNGKey(t + 1), inputs["v"].shape)
            plain_inputs = {n: x for n, x in inputs.items() if n != "level_scales"}
            log_linear_fn = forward_backward(log_linear.log_linear_attention, args.chunk_size)
            calls = [(log_linear_fn, (inputs, cotangent)),
                     (forward_backward(plain_op, args.chunk_size), (plain_inputs, cotangent))]
            (ll_time, ll_min), (plain_time, plain_min) = run_times(calls, args.repeats, CLOCKS[args.clock])
            results[name, t] = ll_time, plain_time
            print(f"{name:<8}{t:>8}{1e3 * ll_time:>15.1f}{1e3 * ll_min:>10.1f}{1e3 * plain_time:>11.1f}"
                  f"{1e3 * plain_min:>10.1f}{ll_time / plain_time:>8.2f}", flush=True)
    lo, hi = min(args.lengths), max(args.lengths)
    if lo == hi:
        return
    linear = hi / lo
    c = args.chunk_size
    t_log_t = linear * math.log2(hi / c) / math.log2(lo / c) if lo > c else float("nan")
    print(f"\ngrowth time(T={hi}) / time(T={lo}); expected: T log T {t_log_t:.1f}, linear {linear:.1f}")
    for name in args.mixers:
        ll_growth = results[name, hi][0] / results[name, lo][0]
        plain_growth = results[name, hi][1] / results[name, lo][1]
        print(f"{name:<8} log-linear {ll_growth:6.1f}   plain {plain_growth:6.1f}")


if __name__ == "__main__":
    main()
