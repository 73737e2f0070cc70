"""Log-linear Gated DeltaNet: every layer keeps O(log T) Fenwick-tree states instead of one.

Log-linear attention (Guo et al. 2025) gives each token a hierarchy of states over power-of-two
spans, so memory grows logarithmically with context while the chunked form stays matmul-rich.
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=2, heads=4, head_dim=16),
    "small": dict(num_layers=12, heads=4, head_dim=64),
    "base": dict(num_layers=12, heads=6, head_dim=64),  # values 2x wider than keys (expand_v = 2)
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "L"
    config.model.mixers = {
        "L": mixer("loglinear_gated_deltanet", num_heads=size["heads"], head_dim=size["head_dim"])
    }
    return config
