"""Pure Mamba-2 (SSD) language model: Mamba-2 blocks only, no FFN (as in the Mamba-2 paper).

Without FFNs the layer count doubles against a transformer of the same size (24 layers at base).
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=2, head_dim=16, state_dim=16),
    "small": dict(num_layers=24, head_dim=64, state_dim=64),
    "base": dict(num_layers=24, head_dim=64, state_dim=128),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "M"
    config.model.ffn = "none"
    config.model.mixers = {"M": mixer("mamba2", head_dim=size["head_dim"], state_dim=size["state_dim"])}
    return config
