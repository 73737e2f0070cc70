"""Jamba-style hybrid with mixture-of-experts: the 7:1 Mamba-2 : attention period of `jamba.py`, and
an MoE feed-forward layer on every other layer (odd layers), the others dense.

Jamba (AI21, 2024) uses 16 experts, top-2, softmax routing with a load-balancing auxiliary loss and
no shared expert, each expert as wide as the dense FFN; MoE on every other layer
(`model.moe_layers.every = 2, offset = 1`), which repeats with the 8-layer period, so the period
scan still compiles one period.
"""

import os

from hybrid_jax.config import config_module

_jamba = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "jamba.py"))

EXPERTS = {"tiny": 8, "small": 16, "base": 16}


def get_config(preset: str = "tiny"):
    config = _jamba.get_config(preset)
    config.model.ffn = "moe"
    moe = config.model.moe
    moe.num_experts, moe.experts_per_token, moe.num_shared_experts = EXPERTS[preset], 2, 0
    moe.mlp_dim = config.model.mlp_dim  # each expert is a full-width FFN
    moe.router = "softmax"
    moe.aux_loss_weight = 0.01
    config.model.moe_layers.every, config.model.moe_layers.offset = 2, 1
    return config
