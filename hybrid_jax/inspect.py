"""Model inspector: per-layer parameters, decode cache per sequence, FLOPs per token, KV-cache saving.

    python -m hybrid_jax.inspect --config experiments/configs/kimi_linear.py:small [--context 4096]

Parameter counts come from the model itself, built abstractly with `nnx.eval_shape` (nothing is
allocated, so base-size configs inspect in seconds). Cache bytes and FLOPs come from each mixer's
`cache_bytes` / `flops_per_token` (hybrid_jax.nn.registry), the cache in bfloat16 (2 bytes).

MoE layers (`model.ffn = "moe"`): a token runs only its top-k routed experts (plus the shared ones
and the router), so the report gives the total parameters next to the active parameters per token
(every routed expert counted k / E times), and FLOPs per token count the routed experts a token runs,
not all E.

For a hybrid (more than one mixer kind) the report compares its decode cache with the same depth
built only from its global softmax layer (MLA if it has one, else full attention) — the comparison
behind Kimi Linear's "up to 75% less KV cache" for a 3:1 KDA:MLA stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flax import nnx

from hybrid_jax.config import ffn_plan, load_config, resolved_mixers
from hybrid_jax.models import build_model
from hybrid_jax.nn import count_params, get_mixer
from hybrid_jax.nn.moe import ffn_active_params, ffn_flops_per_token

CACHE_DTYPE_BYTES = 2  # bfloat16


@dataclasses.dataclass(frozen=True)
class LayerRow:
    index: int
    letter: str
    kind: str
    mixer_params: int
    ffn_kind: str  # "swiglu", "moe" or "none"
    ffn_params: int  # FFN and both block norms
    active_ffn_params: int  # of those, the ones a token uses (MoE: k of the E routed experts)
    cache_bytes: int
    flops_per_token: int


@dataclasses.dataclass(frozen=True)
class Report:
    context: int
    layers: tuple[LayerRow, ...]
    embedding_params: int
    head_params: int  # final norm (+ untied output projection)
    total_params: int
    active_params: int  # per token: the routed experts a token does not run left out
    total_cache_bytes: int
    flops_per_token: int
    reference_kind: str | None  # the global softmax mixer the cache is compared with
    reference_cache_bytes: int | None  # num_layers of it

    @property
    def cache_saving(self) -> float | None:
        if not self.reference_cache_bytes:
            return None
        return 1.0 - self.total_cache_bytes / self.reference_cache_bytes


def _reference_mixer(mixers: dict, pattern: str):
    """The global softmax mixer config of a hybrid: its MLA, else its full attention, else None."""
    in_pattern = [mixers[letter] for letter in dict.fromkeys(pattern)]
    if len({cfg.kind for cfg in in_pattern}) < 2:
        return None
    for kind in ("mla", "attention"):
        for cfg in in_pattern:
            if cfg.kind == kind and cfg.get("window") is None:
                return cfg
    return None


def inspect_model(config, context: int) -> Report:
    """Builds `config.model` abstractly and tabulates it at `context` tokens."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    model_cfg = config.model
    mixers = resolved_mixers(model_cfg)
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    d_model, period = model_cfg.d_model, len(model_cfg.pattern)
    blocks, scanned = abstract.period_blocks, abstract.num_periods - abstract.num_lead

    rows = []
    for index, (letter, ffn_kind) in enumerate(zip(abstract.layer_letters, ffn_plan(model_cfg))):
        # Lead-period blocks hold one layer each; scanned blocks stack `scanned` copies.
        lead_layers = abstract.num_lead * period
        block = blocks[index] if index < lead_layers else blocks[lead_layers + index % period]
        copies = 1 if index < lead_layers else scanned
        cfg = mixers[letter]
        mixer_cls = get_mixer(cfg.kind)
        mixer_params = count_params(block.mixer) // copies
        ffn_params = count_params(block) // copies - mixer_params
        norms = ffn_params - (count_params(block.ffn) // copies if block.ffn is not None else 0)
        rows.append(
            LayerRow(
                index=index, letter=letter, kind=cfg.kind, mixer_params=mixer_params, ffn_kind=ffn_kind,
                ffn_params=ffn_params, active_ffn_params=norms + ffn_active_params(ffn_kind, model_cfg),
                cache_bytes=mixer_cls.cache_bytes(cfg, d_model, context, CACHE_DTYPE_BYTES),
                flops_per_token=mixer_cls.flops_per_token(cfg, d_model, context)
                + ffn_flops_per_token(ffn_kind, model_cfg),
            )
        )
    embedding = count_params(abstract.embed)
    head = count_params(abstract.final_norm) + (
        0 if abstract.lm_head is None else count_params(abstract.lm_head)
    )
    logits_flops = 2 * d_model * model_cfg.vocab_size
    reference = _reference_mixer(mixers, model_cfg.pattern)
    reference_bytes = None
    if reference is not None:
        per_layer = get_mixer(reference.kind).cache_bytes(reference, d_model, context, CACHE_DTYPE_BYTES)
        reference_bytes = per_layer * model_cfg.num_layers
    return Report(
        context=context,
        layers=tuple(rows),
        embedding_params=embedding,
        head_params=head,
        total_params=count_params(abstract),
        active_params=count_params(abstract) - sum(r.ffn_params - r.active_ffn_params for r in rows),
        total_cache_bytes=sum(row.cache_bytes for row in rows),
        flops_per_token=sum(row.flops_per_token for row in rows) + logits_flops,
        reference_kind=None if reference is None else reference.kind,
        reference_cache_bytes=reference_bytes,
    )


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def format_report(report: Report, title: str = "") -> str:
    header = ("layer", "mixer", "mixer params", "ffn", "ffn+norm params", "active", "cache/seq (bf16)",
              "FLOPs/token")
    body = [
        (
            str(r.index),
            f"{r.letter}:{r.kind}",
            f"{r.mixer_params:,}",
            r.ffn_kind,
            f"{r.ffn_params:,}",
            f"{r.active_ffn_params:,}",
            _bytes(r.cache_bytes),
            _human(r.flops_per_token),
        )
        for r in report.layers
    ]
    body.append(("embed", "", f"{report.embedding_params:,}", "", "", "", "", ""))
    logits_flops = report.flops_per_token - sum(r.flops_per_token for r in report.layers)
    body.append(("head", "norm + logits", f"{report.head_params:,}", "", "", "", "", _human(logits_flops)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(
            cell.ljust(w) if i in (0, 1, 3) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )

    out = [title] if title else []
    out += [line(header), "-" * len(line(header)), *map(line, body), ""]
    out.append(f"total parameters        {report.total_params:,} ({_human(report.total_params)})")
    if report.active_params != report.total_params:
        out.append(f"active parameters/token {report.active_params:,} ({_human(report.active_params)}; "
                   "routed experts: the top-k a token runs)")
    out.append(
        f"decode cache / sequence {_bytes(report.total_cache_bytes)} at context {report.context:,} (bf16)"
    )
    out.append(
        f"forward FLOPs / token   {_human(report.flops_per_token)} (mean over a {report.context:,}-token causal "
        f"sequence, routed experts: the top-k only; training ~3x)"
    )
    if report.reference_kind is not None:
        label = f"KV cache vs all-{report.reference_kind}"
        out.append(
            f"{label:<23} {_bytes(report.total_cache_bytes)} vs {_bytes(report.reference_cache_bytes)}: "
            f"{100 * report.cache_saving:.1f}% saved"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_jax.inspect", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        required=True,
        help="path/to/config.py[:preset], e.g. experiments/configs/kimi_linear.py:small",
    )
    parser.add_argument(
        "--context", type=int, default=4096, help="context length for cache bytes and FLOPs (default 4096)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        report = inspect_model(config, args.context)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report, title=f"{args.config}  (context {args.context:,})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
