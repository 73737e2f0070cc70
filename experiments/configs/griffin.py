"""Griffin (De et al. 2024; RecurrentGemma): two recurrent blocks per local-attention block ("RRA").

The recurrent block is the RG-LRU layer (`rg_lru`: a GeLU gate branch times a short conv followed by
the real-gated linear recurrent unit); the attention block is sliding-window multi-query attention
with RoPE on half of each head, as Griffin's local attention. Both keep a bounded decode cache: the
RG-LRU one float32 state per channel plus a 3-token conv history, the attention its last `window`
tokens, so the model decodes with constant memory at any context.
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=3, heads=4, window=64),
    "small": dict(num_layers=12, heads=4, window=2048),
    "base": dict(num_layers=12, heads=12, window=2048),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "RRA"
    local_attention = dict(num_kv_heads=1, window=size["window"], rope_fraction=0.5)
    config.model.mixers = {
        "R": mixer("rg_lru", num_heads=size["heads"]),
        "A": mixer("attention", num_heads=size["heads"], **local_attention),
    }
    return config
