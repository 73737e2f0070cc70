"""Kimi Linear's layer-ratio ablation at pod scale: KDA:MLA 0:1, 1:1, 3:1, 7:1, 15:1 and all-KDA at
matched parameters on Shakespeare (GPT-2 BPE).

    python -m experiments.sweep experiments/sweeps/kimi_ratio_pod.py --out runs/sweeps/kimi_ratio_pod \\
        --launch slurm --nodes 1 --gpus_per_node 8
    python -m experiments.sweep experiments/sweeps/kimi_ratio_pod.py --out runs/sweeps/kimi_ratio_pod \\
        --launch tpu --tpu NAME --zone ZONE --workdir_root /gcs/BUCKET/sweeps/kimi_ratio_pod

The CPU preset (`kimi_ratio.py`) with the Kimi Linear small layers (KDA: 4 heads of 64; NoPE MLA:
4 heads of 64, latent rank 128) at width 256, 16 layers (the 15:1 pattern's period), 512-token
sequences, 5000 steps of 64 rows, each point's SwiGLU width solved to the 3:1 point's non-embedding
parameter count (within 2%). Expected time: under an hour per point on one accelerator; not for a
CPU.
"""
import os

from hybrid_jax.config import config_module

_KIMI = config_module(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "kimi_linear.py"))
_RATIO = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kimi_ratio.py"))
PATTERNS = _RATIO.PATTERNS


def get_config(ratio: str = "3-1"):
    if ratio not in PATTERNS:
        raise ValueError(f"unknown KDA:MLA ratio {ratio!r}; valid values are {list(PATTERNS)}")
    config = _KIMI.get_config("small")
    config.model.num_layers, config.model.pattern = 16, PATTERNS[ratio]
    config.model.mixers.K.impl = "auto"  # the KDA Pallas kernel on GPU / TPU where it supports the shapes
    train = config.train
    train.seq_len, train.batch_size, train.steps = 512, 64, 5000
    train.warmup_steps, train.eval_every, train.checkpoint_every = 250, 500, 500
    return config


SWEEP = {**_RATIO.SWEEP}
