"""Linear + sparse hybrid: three Kimi Delta Attention layers, then one block-sparse attention layer
("KKKS"), repeated.

The KDA layers carry a constant-size state; every fourth layer recovers precise recall with softmax
attention over a few selected blocks (MoBA / NSA-style top-k block selection, the query heads of a
group sharing the selection), so its attention cost per token is (top_k + 1) * block_size keys
rather than the whole context. The sparse layers still cache every key and value (a block may be
selected at any later step); `python -m hybrid_jax.inspect` reports the decode memory and FLOPs.
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    # seq_len 128 / 512 / 1024 (the presets) in blocks of 16 / 64 / 64: 8 / 8 / 16 blocks per sequence.
    "tiny": dict(num_layers=4, heads=4, kv_heads=2, head_dim=16, block_size=16, top_k=2),
    "small": dict(num_layers=12, heads=4, kv_heads=2, head_dim=64, block_size=64, top_k=4),
    "base": dict(num_layers=12, heads=12, kv_heads=4, head_dim=64, block_size=64, top_k=8),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    heads, head_dim = size["heads"], size["head_dim"]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "KKKS"
    config.model.mixers = {
        "K": mixer("kda", num_heads=heads, head_dim=head_dim),
        "S": mixer("block_sparse", num_heads=heads, head_dim=head_dim, num_kv_heads=size["kv_heads"],
                   block_size=size["block_size"], top_k=size["top_k"]),
    }
    return config
