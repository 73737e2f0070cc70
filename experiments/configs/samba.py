"""Samba-style hybrid: Mamba layers alternating with sliding-window attention ("MS").

Samba (Ren et al. 2024) interleaves Mamba (selective scan) for long-range state with sliding-window
attention for precise local recall; both keep a bounded decode cache, so the model decodes with
constant memory at any context.
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=2, heads=4, kv_heads=2, state_dim=16, window=32),
    "small": dict(num_layers=12, heads=4, kv_heads=2, state_dim=16, window=512),
    "base": dict(num_layers=12, heads=12, kv_heads=4, state_dim=16, window=2048),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "MS"
    config.model.mixers = {
        "M": mixer("mamba", state_dim=size["state_dim"]),
        "S": mixer(
            "attention", num_heads=size["heads"], num_kv_heads=size["kv_heads"], window=size["window"]
        ),
    }
    return config
