r"""The LoLCATs report: linearise a pretrained model end to end and compare what each step buys.

    python -m hybrid_jax.lolcats.report --config experiments/lolcats/config.py:smollm2

Runs (or resumes) stage 1 and stage 2 in `workdir`, then measures on the held-out text
(`hybrid_jax.lolcats.text`) the next-token NLL and perplexity of

    original             the pretrained model (every layer softmax attention)
    swap only            every layer LoLCATs with untrained feature maps (identity maps, gamma = 1/2)
    stage 1              after attention transfer
    stage 1 + 2          after LoRA on top of stage 1
    hybrid N, by ...     N layers keep softmax attention (pretrained weights), the rest stage 1:
                         those with the largest relative or raw transfer error, or N evenly spaced
                         (`hybrid_jax.lolcats.selection`)

for each N in `report.softmax_counts`, with the decode memory per sequence at each of
`report.contexts` (bf16 caches, float32 states: `hybrid_jax.inspect`), and a greedy continuation of
`report.prompt` by the original model and by the stage 1 + 2 model (decoded through its recurrent
state and window cache). Prints the table and writes to `report.out_dir`:

    lolcats_report.md        the table, the continuations, the per-layer errors and what ran
    lolcats_report.json      every number
    transfer_errors.png      per-layer transfer MSE before (swap only) and after stage 1, and the
                             relative MSE; the layers kept as softmax by the largest N marked
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from hybrid_jax import plotting
from hybrid_jax.inference.decoding import generate
from hybrid_jax.lolcats.evaluate import decode_bytes, heldout_nll, perplexity
from hybrid_jax.lolcats.finetune import run_finetune
from hybrid_jax.lolcats.selection import hybrid, softmax_layers
from hybrid_jax.lolcats.swap import graft_params, load_teacher
from hybrid_jax.lolcats.text import load_text, tokenize_splits
from hybrid_jax.lolcats.transfer import run_transfer
from hybrid_jax.models.layer_params import model_with_params


def _row(name: str, model_cfg, params, held_out, contexts, softmax: list[int]) -> dict:
    start = time.perf_counter()
    nll = heldout_nll(model_cfg, params, held_out)
    row = {"model": name, "softmax_layers": softmax, "nll": nll, "perplexity": perplexity(nll),
           "decode_bytes": {str(c): decode_bytes(model_cfg, c) for c in contexts}}
    print(f"  {name:<30} NLL {nll:.4f} nats/token, perplexity {row['perplexity']:.2f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return row


def _continuation(model_cfg, params, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    model = model_with_params(model_cfg, params)
    tokens = generate(model, [tokenizer.encode(prompt)], new_tokens, temperature=0.0)
    return tokenizer.decode(tokens[0].tolist())


def build_rows(config, teacher, stage1, stage2, held_out) -> list[dict]:
    """Every model of the module docstring, measured."""
    _, teacher_cfg, _ = teacher
    contexts, num_layers = tuple(config.report.contexts), teacher_cfg.num_layers
    all_layers = list(range(num_layers))
    swap_params = graft_params(stage1.teacher_params, teacher_cfg, stage1.model_cfg, seed=config.seed)
    rows = [_row("original", teacher_cfg, stage1.teacher_params, held_out, contexts, all_layers),
            _row("swap only", stage1.model_cfg, swap_params, held_out, contexts, []),
            _row("stage 1", stage1.model_cfg, stage1.params, held_out, contexts, []),
            _row("stage 1 + 2 (LoRA)", stage2.model_cfg, stage2.params, held_out, contexts, [])]
    for count in config.report.softmax_counts:
        for rule, label in (("relative", "by relative error"), ("raw", "by raw MSE"), ("even", "evenly")):
            keep = softmax_layers(rule, count, raw=stage1.errors, relative=stage1.relative_errors)
            cfg, params = hybrid(stage1.teacher_params, teacher_cfg, stage1.params, stage1.model_cfg, keep,
                                 config.lolcats)
            rows.append(_row(f"hybrid N={count}, {label}", cfg, params, held_out, contexts, keep))
    return rows


def format_table(rows: list[dict], contexts) -> str:
    original = rows[0]["nll"]
    head = ["model", "softmax layers", "NLL (nats/tok)", "perplexity", "vs original"]
    head += [f"decode MB @ {int(c) // 1024}K" for c in contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        layers = row["softmax_layers"]
        kept = "all" if len(layers) == len(rows[0]["softmax_layers"]) else (", ".join(map(str, layers)) or "none")
        cells = [row["model"], kept, f"{row['nll']:.3f}", f"{row['perplexity']:.2f}", f"{row['nll'] - original:+.3f}"]
        cells += [f"{row['decode_bytes'][str(c)] / 2**20:.2f}" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_errors(stage1, keep: list[int], path: str) -> str:
    """Per-layer raw transfer MSE (before and after stage 1, log scale) and relative MSE (after), the
    layers `keep` (kept as softmax by the relative rule) in red."""
    layers = np.arange(len(stage1.errors))
    colors = ["#d62728" if layer in keep else "#1f77b4" for layer in layers]
    fig, (raw_ax, rel_ax) = plotting.figure(2, 1, figsize=(9, 6.5), sharex=True)
    raw_ax.bar(layers - 0.2, stage1.errors_before, width=0.4, color="#bbbbbb", label="swap only (identity maps)")
    raw_ax.bar(layers + 0.2, stage1.errors, width=0.4, color=colors, label="after stage 1")
    raw_ax.set_yscale("log")
    raw_ax.set_ylabel("raw transfer MSE")
    raw_ax.set_title("Per-layer attention-transfer error (held out)")
    raw_ax.legend()
    rel_ax.bar(layers, stage1.relative_errors, color=colors)
    rel_ax.set_ylabel("MSE / mean(attention out^2)")
    rel_ax.set_xlabel(f"layer (red: the {len(keep)} kept as softmax by relative error)")
    rel_ax.set_xticks(layers)  # whole layer numbers, also when there are only a few layers
    for ax in (raw_ax, rel_ax):
        ax.grid(alpha=0.3, axis="y")
    return plotting.save(fig, path)


def run_report(config) -> dict:
    began = time.perf_counter()
    teacher = load_teacher(config.source)
    tokenizer = teacher[2]
    splits = tokenize_splits(load_text(config.text.source), tokenizer, config.text.held_out_fraction)
    held_out = splits.windows("held_out", config.text.eval_seq_len + 1, config.text.eval_sequences)
    print(f"held-out text: {held_out.size} tokens ({config.text.source}); training text {len(splits.train)} tokens")
    stage1 = run_transfer(config, teacher)
    stage2 = run_finetune(config, stage1)
    print("held-out perplexity:", flush=True)
    rows = build_rows(config, teacher, stage1, stage2, held_out)
    contexts = tuple(config.report.contexts)
    table = format_table(rows, contexts)
    continuations = {"original": _continuation(teacher[1], stage1.teacher_params, tokenizer, config.report.prompt),
                     "stage 1 + 2": _continuation(stage2.model_cfg, stage2.params, tokenizer, config.report.prompt)}
    out_dir = config.report.out_dir
    os.makedirs(out_dir, exist_ok=True)
    keep = softmax_layers("relative", max(config.report.softmax_counts), raw=stage1.errors,
                          relative=stage1.relative_errors)
    plot_errors(stage1, keep, os.path.join(out_dir, "transfer_errors.png"))
    minutes = (time.perf_counter() - began) / 60
    result = {"rows": rows, "transfer_mse": stage1.errors, "transfer_mse_before": stage1.errors_before,
              "transfer_rel": stage1.relative_errors, "continuations": continuations, "minutes": minutes,
              "config": json.loads(config.to_json_best_effort())}
    with open(os.path.join(out_dir, "lolcats_report.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "lolcats_report.md"), "w") as f:
        f.write(_markdown(config, table, continuations, stage1, held_out, minutes))
    print(table)
    for name, text in continuations.items():
        print(f"greedy continuation ({name}): {config.report.prompt!r} -> {text!r}")
    print(f"report written to {out_dir} in {minutes:.1f} min")
    return result


def _markdown(config, table, continuations, stage1, held_out, minutes) -> str:
    tc, fc = config.transfer, config.finetune
    errors = ", ".join(f"{e:.2e}" for e in stage1.errors)
    relative = ", ".join(f"{e:.3f}" for e in stage1.relative_errors)
    return "\n".join([
        f"# LoLCATs on {config.source}", "",
        f"Held-out: {held_out.size} tokens of `{config.text.source}` ({held_out.shape[0]} windows of "
        f"{held_out.shape[1] - 1} + 1). Stage 1: {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens per layer "
        f"(lr {tc.learning_rate}); stage 2: LoRA rank {fc.lora_rank}, alpha {fc.lora_alpha} on "
        f"{fc.lora_targets}, {fc.steps} steps x {fc.batch_size} x {fc.seq_len} tokens (lr {fc.learning_rate}). "
        f"Window {config.lolcats.window}. Hybrids use stage-1 weights for their linearised layers. "
        f"Decode memory: bf16 caches, float32 states. Total time {minutes:.1f} min.", "",
        table, "",
        "Greedy continuations of " + repr(config.report.prompt) + ":", "",
        *[f"* {name}: {text!r}" for name, text in continuations.items()], "",
        f"Per-layer held-out transfer MSE after stage 1: {errors}", "",
        f"Relative (MSE / mean square of the attention output): {relative}", "",
        "![transfer errors](transfer_errors.png)", ""])


if __name__ == "__main__":
    from hybrid_jax.lolcats import cli

    cli.run(run_report)
