r"""Context parallelism, per mixer kind: the bytes each device sends per layer and the memory it holds.

    python -m experiments.bench.context_parallel [--seq-len 131072] [--context 8] [--kinds kda,attention]
        [--out DIR]

One layer of each kind, at the `small` preset's width with the mixer config of the experiment config
that uses the kind (else the kind's defaults), runs a forward over B = 1, T tokens (float32), compiled
twice on fake CPU devices: on one device, and with the time axis split over `context` devices
(`hybrid_jax.nn.context.sharded_mixer`). Nothing is executed: every figure comes from the compiled
executables.

* **sent / device**: from the compiled HLO's collectives, per device: an all-gather sends (n-1)/n of
  its result, a collective-permute its operand (= its result), an all-reduce 2 (n-1)/n of it (ring), a
  reduce-scatter (n-1)/n of its operand (n x its result) and an all-to-all (n-1)/n of it.
* **analytic**: what the design says travels (`hybrid_jax.ops.context`): a linear mixer all-gathers
  its (transition, final state) pair, (n-1) (|P| + |S|) x 4 bytes (the state from the layer's decode
  cache; P a K x K matrix per head for the delta rule, K or 1 numbers per head for a per-channel or
  scalar decay, as large as the state for the elementwise recurrences; log-linear layers send every
  Fenwick level's state, L = log2 T + 1 of them), and each short conv sends a
  (W-1) x C halo; attention and block-sparse attention all-gather K and V, (n-1)/n T x (bytes of k
  and v per token), MLA its decompressed keys and values (every head), NSA its selected branch's K and
  V, its T / Bs compressed tokens and a W - 1 token window halo, LoLCATs its linear state plus W-token
  halos of k, v, the feature-mapped pairs and the segment ids. Kinds whose traffic the formula does
  not model show "-" (their HLO figure stands alone).
* **memory / device**: temp + argument + output bytes of `memory_analysis()`, split and unsplit.

Prints a markdown table and writes DIR/context_parallel.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

if __name__ == "__main__":  # fake devices: set before jax is imported
    _count = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--context=")), 8))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_count}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from hybrid_jax.config import load_config, preset_config  # noqa: E402
from hybrid_jax.nn import MIXERS, build_mixer, mixer_config  # noqa: E402
from hybrid_jax.nn.context import sharded_mixer  # noqa: E402
from hybrid_jax.nn.conv import ShortConv  # noqa: E402
from hybrid_jax.nn.kv_cache import KVCache  # noqa: E402
from hybrid_jax.nn.linear_mixer import RecurrentCache  # noqa: E402
from hybrid_jax.nn.sparse_attention import BlockSparseCache  # noqa: E402
from hybrid_jax.ops.context import CONTEXT_AXIS  # noqa: E402
from hybrid_jax.ops.log_linear import FenwickState  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DELTA_KINDS = ("deltanet", "gated_deltanet", "kda")  # transition: K x K per head
ELEMENTWISE_KINDS = ("mamba", "rg_lru")  # transition: as large as the state
SCALAR_DECAY_KINDS = ("mamba2", "linear_attention", "qla", "lolcats")  # transition: one number per head
LOG_LINEAR_DELTA_KINDS = ("loglinear_gated_deltanet", "loglinear_kda")  # K x K; loglinear_mamba2: scalar
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|collective-permute|reduce-scatter|"
                         r"all-to-all)(?:-start)?\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def small_mixer_configs() -> dict[str, object]:
    """kind -> its mixer config in the `small` preset of the first experiment config that uses it."""
    configs = {}
    folder = os.path.join(ROOT, "experiments", "configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name != "__init__.py":
            for cfg in load_config(os.path.join(folder, name) + ":small").model.mixers.values():
                configs.setdefault(cfg.kind, cfg)
    return configs


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES.get(dtype, 4)
    return total


def hlo_bytes_sent(hlo: str, shards: int) -> dict[str, int]:
    """Bytes one device sends, per collective kind, in an optimized HLO module (module docstring)."""
    sent: dict[str, int] = {}
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if not match or "-done" in line:
            continue
        result, op, _ = match.groups()
        out = _array_bytes(result)  # optimized HLO names operands without their shapes: use the result's
        fraction = (shards - 1) / shards
        bytes_ = {"all-gather": out * fraction, "collective-permute": out, "all-reduce": 2 * out * fraction,
                  "reduce-scatter": out * (shards - 1), "all-to-all": out * fraction}[op]
        sent[op] = sent.get(op, 0) + int(bytes_)
    return sent


def analytic_bytes(kind: str, layer, d_model: int, seq_len: int, shards: int) -> int | None:
    """The bytes the design sends per device (module docstring), or None where it does not model it."""
    cache = jax.eval_shape(lambda x: layer.prefill(x, max_len=seq_len)[1],
                           jax.ShapeDtypeStruct((1, 8, d_model), jnp.float32))
    halos = sum((conv.kernel_size - 1) * conv.channels * 4 for _, conv in nnx.iter_graph(layer)
                if isinstance(conv, ShortConv))
    if isinstance(cache, RecurrentCache) and isinstance(cache.state, FenwickState):
        # the (transition, final levels) pair: every Fenwick level's K x V state for T tokens
        levels = cache.state.levels.shape  # [B, HV, L, K, V]
        k_dim = levels[3]
        transition = k_dim * k_dim if kind in LOG_LINEAR_DELTA_KINDS else 1
        return (shards - 1) * 4 * (math.prod(levels) + levels[0] * levels[1] * transition) + halos
    if isinstance(cache, RecurrentCache) and isinstance(cache.state, jax.ShapeDtypeStruct):
        state = cache.state.shape
        if kind in DELTA_KINDS:
            transition = state[:-1] + (state[-2],)
        elif kind in ELEMENTWISE_KINDS:
            transition = state
        elif kind in SCALAR_DECAY_KINDS:
            transition = state[:-2] + (1,)
        else:  # a per-channel decay: K per head
            transition = state[:-1]
        return (shards - 1) * 4 * (math.prod(state) + math.prod(transition)) + halos
    gathered = (shards - 1) * (seq_len // shards)  # tokens an all-gather of a per-token array sends
    if kind == "mla":  # the decompressed keys (nope + rope) and values of every head
        return gathered * layer.num_heads * (layer.nope_dim + layer.rope_dim + layer.v_dim) * 4
    if kind == "lolcats":  # the linear part's (state, scalar decay) pair; W-token halos of k, v, the
        # feature-mapped pairs and the segment ids
        state = cache.state.shape
        pairs = state[1] * (state[2] + state[3])  # keys [H, 2F] and values [H, Dh + 1] per token
        window = 2 * cache.window.k.shape[2] * cache.window.k.shape[3]
        return (shards - 1) * 4 * (math.prod(state) + state[1]) + layer.window * 4 * (pairs + window + 1)
    if kind == "nsa":  # the selected branch's K, V and the compressed tokens gathered, a W - 1 window halo
        per_token = 2 * cache.sparse.k.shape[2] * cache.sparse.k.shape[3] * 4
        return (gathered * per_token + gathered // layer.block_size * per_token
                + (layer.window - 1) * (per_token + 4))
    if isinstance(cache, (KVCache, BlockSparseCache)) and cache.k.shape[1] >= seq_len:  # K and V gathered
        return gathered * (cache.k.shape[2] * cache.k.shape[3] + cache.v.shape[2] * cache.v.shape[3]) * 4
    return None


def measure_kind(kind: str, cfg, d_model: int, seq_len: int, shards: int) -> dict:
    layer = build_mixer(cfg, d_model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    run = jax.jit(lambda params, x: sharded_mixer(nnx.merge(graphdef, params), x, None))
    x = jax.ShapeDtypeStruct((1, seq_len, d_model), jnp.float32)
    single = jax.make_mesh((1,), (CONTEXT_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    split = jax.make_mesh((shards,), (CONTEXT_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:shards])
    row = {"kind": kind}
    for name, mesh in (("1", single), ("cp", split)):
        x_sharded = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, CONTEXT_AXIS)))
        with jax.set_mesh(mesh):
            compiled = run.lower(params, x_sharded).compile()
        memory = compiled.memory_analysis()
        row[f"memory_{name}"] = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                    + memory.output_size_in_bytes)
        if name == "cp":
            row["collectives"] = hlo_bytes_sent(compiled.as_text(), shards)
    row["sent"] = sum(row["collectives"].values())
    row["analytic"] = analytic_bytes(kind, layer, d_model, seq_len, shards)
    return row


def _fmt(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table(rows: list[dict], seq_len: int, shards: int) -> str:
    lines = [f"context parallelism: one layer's forward, B = 1, T = {seq_len}, {shards} shards, float32, "
             "small preset width", "",
             "| kind | sent / device (HLO) | analytic | collectives | memory / device, 1 device | "
             f"memory / device, {shards} shards |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ops = ", ".join(f"{op} {_fmt(b)}" for op, b in sorted(r["collectives"].items()))
        lines.append(f"| {r['kind']} | {_fmt(r['sent'])} | {_fmt(r['analytic'])} | {ops} | "
                     f"{_fmt(r['memory_1'])} | {_fmt(r['memory_cp'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, shards: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r["kind"] for r in rows]
    fig, (sent, memory) = plt.subplots(1, 2, figsize=(13, 4.5))
    sent.barh(kinds, [r["sent"] / 2**20 for r in rows], color="tab:blue")
    sent.set_xscale("log")
    sent.set_xlabel("MiB sent per device per layer (HLO)")
    width = 0.4
    ys = range(len(rows))
    memory.barh([y - width / 2 for y in ys], [r["memory_1"] / 2**20 for r in rows], width, label="1 device")
    memory.barh([y + width / 2 for y in ys], [r["memory_cp"] / 2**20 for r in rows], width,
                label=f"{shards} shards")
    memory.set_yticks(list(ys), kinds)
    memory.set_xscale("log")
    memory.set_xlabel("MiB per device (compiled forward)")
    memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--kinds", default="", help="comma-separated mixer kinds (default: every registered kind)")
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "bench", "results"))
    args = parser.parse_args(argv)
    d_model = preset_config("small").model.d_model
    configs = small_mixer_configs()
    kinds = args.kinds.split(",") if args.kinds else sorted(MIXERS)
    rows = []
    for i, kind in enumerate(kinds, 1):
        cfg = configs.get(kind) or mixer_config(kind)
        if "max_seq_len" in cfg and (cfg.max_seq_len or 0) < args.seq_len:  # log-linear levels for T tokens
            overrides = {key: value for key, value in cfg.to_dict().items() if key != "kind"}
            cfg = mixer_config(kind, **{**overrides, "max_seq_len": args.seq_len})
        print(f"[{i}/{len(kinds)}] {kind}: compiling ...", file=sys.stderr, flush=True)
        rows.append(measure_kind(kind, cfg, d_model, args.seq_len, args.context))
    text = table(rows, args.seq_len, args.context)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "context_parallel.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "context_parallel.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(args.out, "context_parallel.png"), args.context)


if __name__ == "__main__":
    main()
