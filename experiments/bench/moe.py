"""Benchmark of the MoE feed-forward layer: tokens/s of the dropless and capacity dispatch paths
against a dense SwiGLU of the same active size.

    python -m experiments.bench.moe [--tokens 4096] [--d-model 256] [--experts 8] [--top-k 2]
        [--shared 1] [--mlp-dim 256] [--capacity-factor 1.25] [--repeats 5] [--out DIR]

The MoE layer has E routed experts of hidden width h, top-k routing (softmax router) and S shared
experts; a token runs (k + S) experts, so its active feed-forward is a SwiGLU of width (k + S) h,
which is the dense baseline ("dense FFN (k+S)h"). `dense-reference` runs every expert on every token
(the test oracle), for scale. Each row is timed forward only and forward + backward (gradients to
the input and every parameter), the median of `repeats` runs after a warm-up, on tokens [N, d]
= [1, N, d]. Prints a markdown table and writes DIR/moe.md and DIR/moe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench.mixers import time_compiled
from hybrid_jax.nn.moe import MoE, default_moe_config
from hybrid_jax.nn.mlp import SwiGLU


def _timed(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` runs after one (compiling) warm-up."""
    return statistics.median(time_compiled(fn, args, repeats)[0])


def _layer_fns(layer: nnx.Module, dispatch: str | None):
    """(forward, forward + backward), jitted functions of (params, x)."""
    graphdef, params = nnx.split(layer)

    def forward(params, x):
        layer = nnx.merge(graphdef, params)
        return layer(x) if dispatch is None else layer(x, dispatch=dispatch)[0]

    def loss(params, x):
        return jnp.sum(forward(params, x) ** 2)

    return params, jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(args) -> list[dict]:
    cfg = default_moe_config()
    cfg.update(dict(num_experts=args.experts, experts_per_token=args.top_k, num_shared_experts=args.shared,
                    mlp_dim=args.mlp_dim, capacity_factor=args.capacity_factor))
    moe = MoE(cfg, args.d_model, rngs=nnx.Rngs(0))
    active = (args.top_k + args.shared) * args.mlp_dim
    dense = SwiGLU(args.d_model, active, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d_model), jnp.float32)
    variants = [(f"dense FFN ({args.top_k}+{args.shared})h = {active}", dense, None),
                ("moe dropless (ragged_dot)", moe, "dropless"),
                (f"moe capacity (factor {args.capacity_factor})", moe, "capacity"),
                ("moe dense-reference (all experts)", moe, "dense")]
    rows = []
    for name, layer, dispatch in variants:
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        params, forward, train = _layer_fns(layer, dispatch)
        fwd = _timed(forward, params, x, repeats=args.repeats)
        both = _timed(train, params, x, repeats=args.repeats)
        rows.append({"variant": name, "forward_s": fwd, "train_s": both,
                     "forward_tokens_per_s": args.tokens / fwd, "train_tokens_per_s": args.tokens / both})
    return rows


def table(rows: list[dict], args) -> str:
    lines = [f"MoE layer, N={args.tokens} tokens, d={args.d_model}, E={args.experts}, k={args.top_k}, "
             f"S={args.shared}, h={args.mlp_dim}, {jax.devices()[0].platform} ({jax.device_count()} device(s))",
             "", "| variant | forward tokens/s | fwd+bwd tokens/s | fwd+bwd vs dense |", "| --- | ---: | ---: | ---: |"]
    base = rows[0]["train_tokens_per_s"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['forward_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} | "
                     f"{r['train_tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.moe", description=__doc__.splitlines()[0])
    for flag, default in (("tokens", 4096), ("d-model", 256), ("experts", 8), ("top-k", 2), ("shared", 1),
                          ("mlp-dim", 256), ("repeats", 5)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--out", default="experiments/bench/results")
    args = parser.parse_args(argv)
    rows = measure(args)
    text = table(rows, args)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "moe.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
