"""GQA transformer baseline: Llama-style pre-norm blocks (RMSNorm, RoPE attention, SwiGLU).

python -m hybrid_jax.inspect --config experiments/configs/transformer.py:small
"""

from hybrid_jax.config import mixer, preset_config


# d_model comes from the preset (tiny 64, small 256, base 768); heads of 16 / 64 / 64 dims.
SIZES = {
    "tiny": dict(num_layers=2, num_heads=4, num_kv_heads=2),
    "small": dict(num_layers=12, num_heads=4, num_kv_heads=2),
    "base": dict(num_layers=12, num_heads=12, num_kv_heads=4),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "A"
    config.model.mixers = {
        "A": mixer("attention", num_heads=size["num_heads"], num_kv_heads=size["num_kv_heads"])
    }
    return config
