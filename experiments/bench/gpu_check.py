"""GPU check of the Pallas kernels: the compiled kernels against the token recurrence, then their speed
against XLA's chunked form and cuDNN flash attention. Meant for one GPU (written for an H200), under
8 minutes, jax 0.11.2 or newer.

    python -m experiments.bench.gpu_check [--lengths 4096,8192,16384,65536] [--heads 16] [--head-dim 128]
        [--mixers kda,kda_safe,gated_delta_rule] [--chunk-size 64] [--precision P] [--block-v BV]
        [--repeats 5] [--budget-s 420] [--skip-correctness] [--plot PNG] [--dry-run]

1. Correctness (float32, jax.default_matmul_precision("highest")): `pallas_kernels.gated_recurrence`
   compiled for the device, for every transition (DeltaNet, Gated DeltaNet, KDA, SSD-style scalar and
   GLA per-channel non-delta), against `delta_reference` / `gla_reference`: output, final state and
   the gradients to q, k, v, g, beta and the initial state; and the output against hybrid_jax's
   chunked form; KDA once more with the safe gate (gates clipped to >= -5, `safe_gate=True`).
   An odd T and a random initial state. Max error / (max|reference| + 1) <= 1e-4 passes.
2. Speed, one table, bf16 inputs, B = 1: forward and forward + backward (a VJP against a random
   cotangent, gradients to every input) of "pallas" (the kernels behind the ops' front end: q scaled,
   float32 compute, o back in bf16) and "chunk" (hybrid_jax.ops.<mixer>(impl="chunk"), XLA) for each
   mixer, and causal softmax attention `jax.nn.dot_product_attention(implementation="cudnn")`
   (falling back to "xla" with a note). `kda_safe` is KDA with the safe gate (the layers' default).
   The chunk terms' matmul precision is --precision for both paths (default: the ops' platform
   default, "high" = TF32 on GPU); the kernels' own matmuls follow JAX's default (TF32 allowed), as
   in training. --block-v sets the kernels' V tile. Median of --repeats runs after a warm-up; compile time excluded. A failing row (OOM,
   unsupported shape) prints its error and the run goes on; measurements that would start more than
   --budget-s after the script started are skipped (the default keeps an H200 run under 8 minutes).
3. The goals' ratios: chunk / pallas and attention / pallas forward + backward per T and mixer.
   --plot writes forward + backward time against T per op and impl (log-log) to a PNG.

A failing case prints one line in the table and its whole traceback on stderr.

--dry-run runs both parts at tiny shapes in Pallas interpret mode on CPU (a test calls it), so the
script is checked where no GPU is at hand. Exit status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp

import pallas_kernels
from hybrid_jax import ops
from hybrid_jax.ops import gated
from pallas_kernels.intra_chunk import MIN_LOWER_BOUND
from pallas_kernels.precision import PRECISIONS, resolve_precision

CASES = {  # name: (delta, gate, safe gate) with gate None | "scalar" | "channel"
    "deltanet": (True, None, False),
    "gated_deltanet": (True, "scalar", False),
    "kda": (True, "channel", False),
    "kda_safe": (True, "channel", True),
    "ssd": (False, "scalar", False),
    "gla": (False, "channel", False),
}
MIXERS = {  # timed delta-rule mixers: (op, gate, safe gate)
    "kda": ("kda", "channel", False),
    "kda_safe": ("kda", "channel", True),
    "gated_delta_rule": ("gated_delta_rule", "scalar", False),
}
RTOL = 1e-4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.gpu_check", description=__doc__.split("\n")[0]
    )
    arg = parser.add_argument
    arg("--lengths", default="4096,8192,16384,65536", help="comma-separated sequence lengths to time")
    arg("--heads", type=int, default=16)
    arg("--head-dim", type=int, default=128)
    arg("--mixers", default=",".join(MIXERS), help=f"comma-separated, from {list(MIXERS)}")
    arg("--chunk-size", type=int, default=64)
    arg("--precision", choices=PRECISIONS, help="matmul precision of the chunk terms (default: platform's)")
    arg("--block-v", type=int, help="V tile of the Pallas kernels (default: the kernels' own)")
    arg("--skip-correctness", action="store_true", help="timings only")
    arg("--plot", help="PNG path for forward + backward time against T")
    arg("--repeats", type=int, default=5)
    arg("--budget-s", type=float, default=420.0,
        help="skip the timing rows that would start this many seconds after the script started")
    arg("--dry-run", action="store_true", help="tiny shapes, interpret mode on CPU")
    args = parser.parse_args(argv)
    if args.dry_run:  # one mixer and one correctness case run every code path of the script
        args.lengths, args.heads, args.head_dim, args.chunk_size, args.repeats = "40", 2, 16, 16, 1
        args.mixers = "kda_safe"
    args.interpret = True if args.dry_run else None  # None: compiled on a GPU
    args.precision = resolve_precision(args.precision, "gpu_check")
    args.lengths = [int(t) for t in args.lengths.split(",") if t.strip()]
    args.mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; valid choices are {list(MIXERS)}")
    return args


def _short_error(err: BaseException, trace: bool = True) -> str:
    """One line for the table; the whole traceback goes to stderr (unless the failure is expected)."""
    if trace:
        traceback.print_exception(err, file=sys.stderr)
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:140]}"


# ----------------------------------------------------------------------------- part 1: correctness


def make_inputs(key, b, t, h, k_dim, v_dim, *, delta, gate, safe=False, dtype=jnp.float32):
    """Valid inputs of the recurrence: unit-norm keys, log-sigmoid gates (clipped to the safe gate's
    bound when `safe`), sigmoid beta."""
    keys = jax.random.split(key, 6)
    normal = lambda i, shape: jax.random.normal(keys[i], shape, jnp.float32)  # noqa: E731
    q = normal(0, (b, t, h, k_dim))
    k = normal(1, (b, t, h, k_dim))
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v = normal(2, (b, t, h, v_dim))
    g = None
    if gate is not None:
        g = jax.nn.log_sigmoid(3.0 + normal(3, (b, t, h, k_dim if gate == "channel" else 1)))
        g = jnp.maximum(g, MIN_LOWER_BOUND) if safe else g
    beta = jax.nn.sigmoid(normal(4, (b, t, h))) if delta else None
    state = normal(5, (b, h, k_dim, v_dim))
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return tuple(map(cast, (q, k, v, g, beta))) + (state,)


def _loss_and_grads(fn):
    def loss(args):
        o, final = fn(*args)
        po = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(o * po) + jnp.sum(jnp.sin(final)), (o, final)

    return jax.jit(lambda *args: jax.value_and_grad(loss, has_aux=True)(args))


def _relative_error(actual, expected):
    return float(jnp.max(jnp.abs(actual - expected)) / (jnp.max(jnp.abs(expected)) + 1.0))


def check_correctness(args) -> bool:
    b, t, h, dim, chunk = (1, 40, 2, 16, 16) if args.dry_run else (2, 300, 4, 64, 64)
    print(
        f"\n== correctness: compiled kernels vs token recurrence (B={b}, T={t}, H={h}, K=V={dim}, "
        f"chunk {chunk}, float32, precision highest)"
    )
    kernels = {
        safe: _loss_and_grads(
            lambda q, k, v, g, beta, s, safe=safe: pallas_kernels.gated_recurrence(
                q, k, v, g, beta, s, chunk_size=chunk, interpret=args.interpret, safe_gate=safe
            )
        )
        for safe in (False, True)
    }
    references = {
        True: _loss_and_grads(pallas_kernels.delta_reference),
        False: _loss_and_grads(lambda q, k, v, g, beta, s: pallas_kernels.gla_reference(q, k, v, g, s)),
    }
    chunked = jax.jit(gated.recurrence_chunk, static_argnames="chunk_size")
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dstate"]
    all_ok = True
    cases = ["kda", "kda_safe"] if args.dry_run else list(CASES)
    with jax.default_matmul_precision("highest"):
        for case in cases:
            delta, gate, safe = CASES[case]
            inputs = make_inputs(jax.random.key(len(case)), b, t, h, dim, dim, delta=delta, gate=gate, safe=safe)
            try:
                (_, (o, final)), grads = kernels[safe](*inputs)
                (_, (o_ref, final_ref)), grads_ref = references[delta](*inputs)
                o_chunk, _ = chunked(*inputs, chunk_size=chunk)
                errors = {
                    n: _relative_error(a, e)
                    for n, a, e in zip(
                        names, (o, final) + tuple(grads), (o_ref, final_ref) + tuple(grads_ref)
                    )
                    if a is not None
                }
                errors["o vs chunk"] = _relative_error(o, o_chunk)
                ok = all(err <= RTOL for err in errors.values())
                detail = "  ".join(f"{n} {err:.1e}" for n, err in errors.items())
            except Exception as err:  # noqa: BLE001 -- report and keep checking the other cases
                ok, detail = False, _short_error(err)
            all_ok &= ok
            print(f"  {case:15s} {'PASS' if ok else 'FAIL'}  {detail}", flush=True)
    return all_ok


# ----------------------------------------------------------------------------- part 2: speed


def pallas_mixer(args, safe):
    """The ops' front end around the kernels: q scaled by K^-1/2, float32 compute, o in the input dtype."""

    def run(q, k, v, g, beta):
        b, _, h, k_dim = q.shape
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        g = g[..., None] if g.ndim == 3 else g
        state = jnp.zeros((b, h, k_dim, v.shape[-1]), jnp.float32)
        o, _ = pallas_kernels.gated_recurrence(
            f32(q) * k_dim**-0.5,
            f32(k),
            f32(v),
            f32(g),
            f32(beta),
            state,
            chunk_size=args.chunk_size,
            interpret=args.interpret,
            block_v=args.block_v,
            safe_gate=safe,
            precision=args.precision,
        )
        return o.astype(v.dtype)

    return run


def chunk_mixer(args, op_name, safe):
    op = getattr(ops, op_name)
    options = {"safe_gate": True} if safe else {}
    return lambda q, k, v, g, beta: op(
        q, k, v, g=g, beta=beta, impl="chunk", chunk_size=args.chunk_size, precision=args.precision, **options
    )[0]


def attention(implementation):
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation
    )


def time_fn(fn, inputs, repeats, backward):
    """Median seconds of fn (or of its VJP against a random cotangent) after compile and warm-up."""
    if backward:
        out = jax.eval_shape(fn, *inputs)
        cotangent = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(out.dtype)
        call, call_args = (lambda ct, *xs: jax.vjp(fn, *xs)[1](ct)), (cotangent, *inputs)
    else:
        call, call_args = fn, inputs
    compiled = jax.jit(call).lower(*call_args).compile()
    jax.block_until_ready(compiled(*call_args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_row(label, fn, inputs, args, deadline):
    cells, notes = [], []
    for backward in (False, True):
        if time.perf_counter() > deadline:
            cells.append("-")
            notes.append("skipped: time budget")
            continue
        try:
            cells.append(f"{time_fn(fn, inputs, args.repeats, backward) * 1e3:.2f}")
        except Exception as err:  # noqa: BLE001 -- OOM / unsupported: report the row and go on
            cells.append("failed")
            notes.append(_short_error(err))
    row = (*label, *cells, "; ".join(dict.fromkeys(notes)))
    print("  " + " | ".join(str(c) for c in row), flush=True)
    return row


def attention_row(t, q, k, v, args, deadline):
    label = (t, "softmax attention", "cudnn")
    try:
        jax.block_until_ready(jax.jit(attention("cudnn"))(q[:, :128], k[:, :128], v[:, :128]))
    except Exception as err:  # noqa: BLE001 -- no cuDNN flash attention here: use XLA's
        row = measure_row((t, "softmax attention", "xla"), attention("xla"), (q, k, v), args, deadline)
        unavailable = f"cudnn unavailable ({_short_error(err, trace=False)})"
        return row[:-1] + ("; ".join(filter(None, [unavailable, row[-1]])),)
    return measure_row(label, attention("cudnn"), (q, k, v), args, deadline)


def time_all(args, deadline) -> list[tuple]:
    h, d, chunk = args.heads, args.head_dim, args.chunk_size
    print(f"\n== speed: B=1, H={h}, D={d}, bf16 inputs, chunk {chunk}, terms precision {args.precision}, "
          f"block_v {args.block_v or 'default'}, median of {args.repeats} (ms)")
    print("  T | op | impl | fwd ms | fwd+bwd ms | note")
    rows = []
    for t in args.lengths:
        for name in args.mixers:
            op_name, gate, safe = MIXERS[name]
            try:
                q, k, v, g, beta, _ = make_inputs(
                    jax.random.key(t), 1, t, h, d, d, delta=True, gate=gate, safe=safe, dtype=jnp.bfloat16
                )
            except Exception as err:  # noqa: BLE001
                rows.append((t, name, "-", "failed", "failed", _short_error(err)))
                continue
            g = g[..., 0] if gate == "scalar" else g  # the op's layout: [B, T, H] scalar gate
            for impl, fn in (
                ("pallas", pallas_mixer(args, safe)),
                ("chunk", chunk_mixer(args, op_name, safe)),
            ):
                rows.append(measure_row((t, name, impl), fn, (q, k, v, g, beta), args, deadline))
            del q, k, v, g, beta
        keys = jax.random.split(jax.random.key(t + 1), 3)
        qkv = [jax.random.normal(key, (1, t, h, d), jnp.bfloat16) for key in keys]
        rows.append(attention_row(t, *qkv, args, deadline))
        del qkv
    return rows


def print_table(rows):
    header = ("T", "op", "impl", "fwd ms", "fwd+bwd ms", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print("\n" + line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def _fwd_bwd_ms(rows) -> dict:
    """{(T, op, impl): forward + backward ms} of the rows that have a time ("failed" / "-" left out)."""
    times = {}
    for t, op, impl, _, fwd_bwd, _ in rows:
        try:
            times[int(t), op, impl] = float(fwd_bwd)
        except ValueError:
            pass
    return times


def print_ratios(rows):
    """Speed-ups of the Pallas path, forward + backward: chunk / pallas and attention / pallas."""
    times = {(t, op if impl in ("pallas", "chunk") else "attention", impl): ms
             for (t, op, impl), ms in _fwd_bwd_ms(rows).items()}
    print("\nfwd+bwd speed-up of pallas: T | mixer | vs XLA chunk | vs softmax attention")
    for t, op, impl in sorted(times):
        if impl != "pallas":
            continue
        pallas = times[t, op, impl]
        chunk = times.get((t, op, "chunk"))
        attn = times.get((t, "attention", "cudnn"), times.get((t, "attention", "xla")))
        ratio = lambda other: "-" if other is None else f"{other / pallas:.2f}x"  # noqa: E731
        print(f"  {t} | {op} | {ratio(chunk)} | {ratio(attn)}")


def plot_rows(rows, path):
    """Forward + backward ms against T, one line per (op, impl), log-log; failed cells left out."""
    from hybrid_jax import plotting

    lines = {}
    for (t, op, impl), ms in _fwd_bwd_ms(rows).items():
        lines.setdefault(f"{op} ({impl})", []).append((t, ms))
    fig, ax = plotting.figure(figsize=(7, 4.5))
    for label, points in sorted(lines.items()):
        ts, ms = zip(*sorted(points))
        ax.plot(ts, ms, "o-" if "pallas" in label else "s--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="forward + backward (ms)",
           title="Pallas state pass vs XLA chunked form vs cuDNN attention")
    ax.legend(fontsize=8)
    return plotting.save(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    device = jax.devices("cpu")[0] if args.dry_run else jax.devices()[0]
    print(
        f"jax {jax.__version__}, device {device.platform}: {device.device_kind}"
        + (" (dry run: interpret mode)" if args.dry_run else "")
    )
    if not args.dry_run and device.platform != "gpu":
        print("warning: no GPU; the kernels run in interpret mode and the timings mean nothing")
    with warnings.catch_warnings(), jax.default_device(device):
        # jax 0.12 deprecates the Pallas Triton backend (in favour of Mosaic GPU); the kernels use it.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        correct = True if args.skip_correctness else check_correctness(args)
        rows = time_all(args, deadline)
    print_table(rows)
    print_ratios(rows)
    if args.plot and rows:
        print(f"wrote {plot_rows(rows, args.plot)}")
    print(f"\ncorrectness: {'skipped' if args.skip_correctness else 'PASS' if correct else 'FAIL'}")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
