"""MQAR across mixers, widths and key-value counts (Zoology, Arora et al. 2023, Fig. 2 style), CPU-sized.

    python -m experiments.sweep experiments/sweeps/mqar.py --out runs/sweeps/mqar

Every mixer below as a 2-layer model (mixer + SwiGLU blocks, FFN width 2 d_model) on multi-query
associative recall (`data.source = "mqar"`, vocabulary 128, sequences of 64 tokens), scored by the
accuracy over the query positions of a fixed held-out set. 30 points: every mixer at width 64 with
8 and 4 key-value pairs (accuracy vs pairs) and at width 32 with 8 pairs (accuracy vs width); the
two pair counts at one width run the same programs, so the second reuses the compilation cache.

Expected CPU time: about an hour on 2 cores shared with other jobs (measured: 58 minutes summed
over the points; the delta-rule family ran at 1-3k tokens/s there and dominates), less on idle
cores. This is the workflow at CPU scale, not Zoology's result: 200 steps of 32 rows are about
1/500 of Zoology's training, so recall has barely started to form (attention and linear attention
sit at the 1/pairs plateau of knowing which values are in the context); `mqar_pod.py` is the grid
to compare with the paper.
"""
from hybrid_jax.config import mixer, preset_config

# The mixers, each with the per-layer settings that hold at widths 32 .. 512: two heads (head dim
# d_model / 2) for the attention-like and delta-rule layers; Mamba-2 heads of 16 channels.
MIXERS = {
    "attention": dict(num_heads=2),
    "linear_attention": dict(num_heads=2),
    "gla": dict(num_heads=2),
    "mamba2": dict(head_dim=16, state_dim=64),
    "deltanet": dict(num_heads=2),
    "gated_deltanet": dict(num_heads=2),
    "kda": dict(num_heads=2),
    "loglinear_mamba2": dict(head_dim=16, state_dim=64, max_seq_len=1024),
    "loglinear_gated_deltanet": dict(num_heads=2, max_seq_len=1024),
    "loglinear_kda": dict(num_heads=2, max_seq_len=1024),
}


def get_config(kind: str = "attention"):
    """A 2-layer model of mixer `kind` on MQAR (width and pairs are the sweep's overrides)."""
    if kind not in MIXERS:
        raise ValueError(f"unknown MQAR mixer {kind!r}; valid values are {sorted(MIXERS)}")
    config = preset_config("tiny")
    model, train = config.model, config.train
    model.num_layers, model.pattern = 2, "X"
    model.mixers = {"X": mixer(kind, **MIXERS[kind])}
    model.vocab_size, model.d_model, model.mlp_dim = 128, 64, 128
    config.data.source, config.data.val_rows = "mqar", 256
    config.data.mqar.num_kv_pairs = 8
    train.seq_len, train.batch_size, train.steps = 64, 32, 200
    train.learning_rate, train.warmup_steps, train.weight_decay = 3e-3, 20, 0.1
    train.log_every, train.eval_every, train.eval_steps, train.checkpoint_every = 20, 100, 4, 100
    return config


def _width(d_model: int, pairs: list[int]) -> dict:
    return {"preset": list(MIXERS), "model.d_model": [d_model], "model.mlp_dim": [2 * d_model],
            "data.mqar.num_kv_pairs": pairs}


SWEEP = {
    # Mixer by mixer: the two pair counts at width 64 run back to back (one compilation).
    "grid": [{**_width(64, [8, 4]), "preset": [kind]} for kind in MIXERS]
    + [{**_width(32, [8]), "preset": [kind]} for kind in MIXERS],
    "name": "{preset}-d{model.d_model}-kv{data.mqar.num_kv_pairs}",
    "plots": [
        {"x": "model.d_model", "y": "val_accuracy", "series": "preset", "facet": "data.mqar.num_kv_pairs",
         "title": "MQAR accuracy vs width (Zoology Fig. 2 style)"},
        {"x": "data.mqar.num_kv_pairs", "y": "val_accuracy", "series": "preset", "facet": "model.d_model",
         "title": "MQAR accuracy vs key-value pairs"},
    ],
}
