"""Gated DeltaNet hybrid: three Gated DeltaNet layers, then one global attention layer ("GGGA").

Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025) combines Mamba-2's scalar decay with the delta
rule; the hybrid keeps one softmax attention layer in four for exact retrieval.
"""

from hybrid_jax.config import mixer, preset_config


# Gated DeltaNet values are 2x wider than keys (expand_v = 2), so its layers use half the
# attention heads to keep the base preset near 125M parameters.
SIZES = {
    "tiny": dict(num_layers=4, gdn_heads=4, attention_heads=4, kv_heads=2, head_dim=16),
    "small": dict(num_layers=12, gdn_heads=4, attention_heads=4, kv_heads=2, head_dim=64),
    "base": dict(num_layers=12, gdn_heads=6, attention_heads=12, kv_heads=4, head_dim=64),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "GGGA"
    config.model.mixers = {
        "G": mixer("gated_deltanet", num_heads=size["gdn_heads"], head_dim=size["head_dim"]),
        "A": mixer("attention", num_heads=size["attention_heads"], num_kv_heads=size["kv_heads"]),
    }
    return config
