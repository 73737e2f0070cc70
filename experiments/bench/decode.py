"""Per-token decode latency and decode-cache size against context: transformer vs Kimi Linear.

    python -m experiments.bench.decode [--contexts 1024,8192,32768,131072] [--steps 20] [--dtype bfloat16]

For each model (default: the small transformer and the small kimi_linear, untrained: latency does
not depend on the weights) and context C, the cache is sized for C tokens and filled by prefilling a
short prompt, then every row's position is moved to C - steps - warmup, so the timed steps decode the
last positions before C. Cache slots past the prompt hold zeros instead of real keys: a decode step
reads every slot of a global KV / latent cache whatever it holds (masked by position), so its cost is
that of a real C-token context, without prefilling C tokens. Latency is the median over `steps`
jitted decode steps (cache donated), each timed to `block_until_ready`, after `warmup` steps; on a
shared CPU the process CPU time per step (all threads) is printed too, a steadier measure of work.

Cache bytes are measured on the cache pytree the prefill returns (per sequence, floating-point
arrays only), which in bfloat16 is the accounting of `python -m hybrid_jax.inspect`. The last column
compares Kimi Linear's cache with an all-MLA model of the same depth (inspect's reference); the
"kda_only" column is Kimi Linear without its MLA layers (9 KDA layers), the part whose latency should
not depend on the context.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.inference import Decoder, cache_bytes
from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
PROMPT_TOKENS = 16


def kda_layers_only(config):
    """Kimi Linear without its MLA layers: its KDA layers alone (the part that should not grow)."""
    config.model.num_layers = config.model.num_layers * config.model.pattern.count("K") // len(config.model.pattern)
    config.model.pattern, config.model.mixers = "K", {"K": config.model.mixers.K}
    return config


# name -> (config, edit); "kda_only" isolates the recurrent part of kimi_linear.
MODELS = {
    "transformer": (os.path.join(CONFIGS, "transformer.py:small"), None),
    "kimi_linear": (os.path.join(CONFIGS, "kimi_linear.py:small"), None),
    "kda_only": (os.path.join(CONFIGS, "kimi_linear.py:small"), kda_layers_only),
}


def measure(decoder: Decoder, config, context: int, *, steps: int, warmup: int) -> dict:
    """Median decode-step latency (ms) at `context`, and the measured and inspected cache bytes."""
    if context < PROMPT_TOKENS + steps + warmup:
        raise ValueError(f"context {context} is too short for {steps} + {warmup} steps after the prompt")
    prompt = jax.random.randint(jax.random.key(0), (1, PROMPT_TOKENS), 0, config.model.vocab_size)
    _, cache = decoder.prefill(prompt, max_len=context)
    measured = cache_bytes(cache)
    cache = cache._replace(position=jnp.full_like(cache.position, context - steps - warmup))
    token = jnp.zeros((1,), jnp.int32)
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        logits, cache = decoder.decode_step(token, cache)
        logits.block_until_ready()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    report = inspect_model(config, context)
    return dict(ms=1e3 * statistics.median(wall), cpu_ms=1e3 * statistics.median(cpu), bytes=measured,
                inspect_bytes=report.total_cache_bytes, reference_bytes=report.reference_cache_bytes)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,8192,32768,131072")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]

    results = {}
    for name, (spec, edit) in MODELS.items():
        config = load_config(spec)
        config = config if edit is None else edit(config)
        config.model.dtype = args.dtype
        decoder = Decoder(build_model(config.model, rngs=nnx.Rngs(0)))
        for context in contexts:
            results[name, context] = row = measure(decoder, config, context, steps=args.steps, warmup=args.warmup)
            if args.dtype == "bfloat16" and row["bytes"] != row["inspect_bytes"]:
                raise AssertionError(f"{name} @ {context}: measured cache {row['bytes']} B != inspect's "
                                     f"{row['inspect_bytes']} B")
            print(f"  {name:<12} context {context:>7,}: {row['ms']:8.2f} ms/token ({row['cpu_ms']:.1f} CPU ms), "
                  f"cache {_mib(row['bytes'])}", flush=True)

    print(f"\ndecode, batch 1, {args.dtype}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"median of {args.steps} steps after {args.warmup} warmup; cache filled by a {PROMPT_TOKENS}-token "
          "prefill and the position set to the context (see the module docstring)")
    header = ("context", "transformer ms/tok (CPU ms)", "transformer cache", "kimi_linear ms/tok (CPU ms)",
              "kimi_linear cache", "kimi / all-MLA cache", "kda_only ms/tok (CPU ms)")
    rows = []
    for context in contexts:
        t, k, r = (results[name, context] for name in ("transformer", "kimi_linear", "kda_only"))
        rows.append((f"{context:,}", f"{t['ms']:.2f} ({t['cpu_ms']:.1f})", _mib(t["bytes"]),
                     f"{k['ms']:.2f} ({k['cpu_ms']:.1f})", _mib(k["bytes"]),
                     f"{100 * k['bytes'] / k['reference_bytes']:.1f}%", f"{r['ms']:.2f} ({r['cpu_ms']:.1f})"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    first, last = contexts[0], contexts[-1]
    for name in MODELS:
        growth = results[name, last]["ms"] / results[name, first]["ms"]
        cpu_growth = results[name, last]["cpu_ms"] / results[name, first]["cpu_ms"]
        print(f"{name}: latency x{growth:.2f} (CPU time x{cpu_growth:.2f}) from {first:,} to {last:,} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
