"""Kimi Linear: three Kimi Delta Attention layers, then one NoPE MLA layer ("KKKM"), repeated.

Kimi Linear (Moonshot AI, 2025) interleaves KDA and MLA 3:1; the MLA layers use no positional
encoding (`qk_rope_head_dim = 0`), position coming from the KDA layers' short convolutions and
decay. Three quarters of the layers keep a constant-size state, so the KV cache shrinks by up to
75% against an all-MLA model (`python -m hybrid_jax.inspect` reports it).
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=4, heads=4, head_dim=16, kv_lora_rank=32),
    "small": dict(num_layers=12, heads=4, head_dim=64, kv_lora_rank=128),
    "base": dict(num_layers=12, heads=12, head_dim=64, kv_lora_rank=256),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    heads, head_dim = size["heads"], size["head_dim"]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "KKKM"
    config.model.mixers = {
        "K": mixer("kda", num_heads=heads, head_dim=head_dim),
        "M": mixer(
            "mla",
            num_heads=heads,
            q_lora_rank=0,
            kv_lora_rank=size["kv_lora_rank"],
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=0,  # NoPE
            v_head_dim=head_dim,
        ),
    }
    return config
