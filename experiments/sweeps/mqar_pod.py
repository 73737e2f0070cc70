"""MQAR across mixers, widths and key-value counts at the scale of Zoology's Fig. 2, for a pod.

    python -m experiments.sweep experiments/sweeps/mqar_pod.py --out runs/sweeps/mqar_pod --launch tpu \\
        --tpu NAME --zone ZONE --workdir_root /gcs/BUCKET/sweeps/mqar_pod
    python -m experiments.sweep experiments/sweeps/mqar_pod.py --out runs/sweeps/mqar_pod --launch slurm \\
        --nodes 1 --gpus_per_node 8

The CPU preset's mixers (`mqar.py`) with Zoology's task sizes: vocabulary 8192, 256-token sequences,
4 to 64 key-value pairs, widths 64 to 512, 20k steps of 256 rows (about 5M training rows, near
Zoology's 100k rows x 64 epochs), 2 layers. 160 points; the mixers with Pallas kernels take
`impl="auto"` (the kernel where the accelerator supports the shapes), the others keep their
chunked form. Expected time: minutes per point on one accelerator, far too long for
a CPU (about a day per point).
"""
import os

from hybrid_jax.config import config_module

_MQAR = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py"))
MIXERS = _MQAR.MIXERS
WIDTHS = (64, 128, 256, 512)
KERNEL_MIXERS = ("linear_attention", "gla", "mamba2", "deltanet", "gated_deltanet", "kda")  # impl="auto"


def get_config(kind: str = "attention"):
    config = _MQAR.get_config(kind)
    if kind in KERNEL_MIXERS:
        config.model.mixers.X.impl = "auto"  # the Pallas kernel on GPU / TPU where it supports the shapes
    config.model.vocab_size = 8192
    config.data.val_rows = 3000
    train = config.train
    train.seq_len, train.batch_size, train.steps = 256, 256, 20000
    train.learning_rate, train.warmup_steps = 1e-3, 1000
    train.log_every, train.eval_every, train.eval_steps, train.checkpoint_every = 100, 2000, 8, 2000
    return config


SWEEP = {
    "grid": [{"preset": list(MIXERS), "model.d_model": [d], "model.mlp_dim": [2 * d],
              "data.mqar.num_kv_pairs": [4, 16, 32, 64]} for d in WIDTHS],
    "name": "{preset}-d{model.d_model}-kv{data.mqar.num_kv_pairs}",
    "plots": _MQAR.SWEEP["plots"],
}
