"""Jamba-style hybrid: Mamba-2 and attention 7:1, attention in the middle of each 8-layer period.

Jamba (AI21, 2024) places one attention layer per eight and uses no positional encoding: the
Mamba layers carry position, so the attention layers here are NoPE GQA (`rope=False`).
(Jamba proper uses Mamba-1 layers and MoE every other FFN; this config isolates the 7:1 ratio.)
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=8, heads=4, kv_heads=2, head_dim=16, state_dim=16),
    "small": dict(num_layers=8, heads=4, kv_heads=2, head_dim=64, state_dim=64),
    "base": dict(num_layers=8, heads=12, kv_heads=4, head_dim=64, state_dim=128),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "MMMMAMMM"
    config.model.mixers = {
        "M": mixer("mamba2", head_dim=size["head_dim"], state_dim=size["state_dim"]),
        "A": mixer("attention", num_heads=size["heads"], num_kv_heads=size["kv_heads"], rope=False),
    }
    return config
