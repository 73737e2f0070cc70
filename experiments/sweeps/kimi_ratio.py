"""Kimi Linear's layer-ratio ablation, CPU-sized: KDA:MLA 0:1, 1:1, 3:1, 7:1, 15:1 and all-KDA at
matched parameters on byte-level Shakespeare.

    python -m experiments.sweep experiments/sweeps/kimi_ratio.py --out runs/sweeps/kimi_ratio

Sixteen layers in every point (the 15:1 pattern's period), the Kimi Linear tiny layers (KDA: 4 heads
of 16; NoPE MLA: 4 heads of 16, latent rank 32) at width 64; each point's SwiGLU width is solved
so that its non-embedding parameter count is within 2% of the 3:1 point's. Reported: validation
loss, perplexity and bits per byte on the last 1% of the corpus.

Expected CPU time: about 25 minutes on 2 cores shared with other jobs (measured 24.5; the 15:1
point, whose 16-layer period compiles and runs unrolled, took 13 of them). 100 steps of 8 x 64
bytes is a smoke-scale run: it measures how fast each stack fits byte statistics from
initialisation (there, fewer KDA layers fit faster), not the ratios' ranking after training;
`kimi_ratio_pod.py` is the comparison with the paper.
"""
import os

from hybrid_jax.config import config_module

_KIMI = config_module(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "kimi_linear.py"))

# KDA:MLA ratio -> the 16-layer pattern's period (K = KDA, M = MLA).
PATTERNS = {"0-1": "M", "1-1": "KM", "3-1": "KKKM", "7-1": "K" * 7 + "M", "15-1": "K" * 15 + "M", "1-0": "K"}


def get_config(ratio: str = "3-1"):
    """Kimi Linear tiny layers, 16 deep, in the pattern of KDA:MLA `ratio` ("3-1", ... or "1-0": all KDA)."""
    if ratio not in PATTERNS:
        raise ValueError(f"unknown KDA:MLA ratio {ratio!r}; valid values are {list(PATTERNS)}")
    config = _KIMI.get_config("tiny")
    config.model.num_layers, config.model.pattern = 16, PATTERNS[ratio]
    config.data.val_fraction = 0.01
    train = config.train
    train.seq_len, train.batch_size, train.steps = 64, 8, 100
    train.learning_rate, train.warmup_steps = 2e-3, 10
    train.log_every, train.eval_every, train.eval_steps, train.checkpoint_every = 20, 50, 8, 50
    return config


SWEEP = {
    "grid": {"preset": list(PATTERNS)},
    "name": "kda_mla_{preset}",
    "match_params": {"solve": "model.mlp_dim", "target": "kda_mla_3-1", "multiple_of": 8, "tolerance": 0.02},
    "plots": [
        {"x": "preset", "y": "val_loss", "title": "validation loss vs KDA:MLA ratio (matched parameters)"},
        {"x": "preset", "y": "val_bits_per_byte", "title": "validation bits/byte vs KDA:MLA ratio"},
    ],
}
