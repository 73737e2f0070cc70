"""Kimi Linear with MoE feed-forward layers: "KKKM" (KDA x3, NoPE MLA), MoE from the second layer on.

Kimi Linear (Moonshot AI, 2025) keeps the first layer dense and gives every later layer a
mixture-of-experts FFN with one shared expert, a sigmoid router with normalised top-k weights and
auxiliary-loss-free balancing (the DeepSeek-V3 recipe: a per-expert bias steers the choice and is
nudged towards the mean load after every step). The mixers are those of `kimi_linear.py`.

Sizes keep the *active* FFN of every MoE layer equal to the dense FFN of `kimi_linear.py` at the
same preset: (top-k + shared) experts of width mlp_dim / 3 = the dense mlp_dim, so the two
configs compare at equal active parameters (plus the router, d_model * E per layer).
"""

import os

from hybrid_jax.config import config_module, preset_config

_kimi = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kimi_linear.py"))

MOE = {
    "tiny": dict(num_experts=8, experts_per_token=2),
    "small": dict(num_experts=16, experts_per_token=2),
    "base": dict(num_experts=32, experts_per_token=2),
}


def get_config(preset: str = "tiny"):
    config = _kimi.get_config(preset)
    dense_mlp = preset_config(preset).model.mlp_dim
    moe = config.model.moe
    config.model.ffn = "moe"
    moe.num_experts, moe.experts_per_token = MOE[preset]["num_experts"], MOE[preset]["experts_per_token"]
    moe.num_shared_experts = 1
    moe.mlp_dim = dense_mlp // (moe.experts_per_token + moe.num_shared_experts)
    moe.router = "sigmoid"
    moe.normalize_weights = True
    # DeepSeek-V3's 1e-3 per step balances over thousands of steps; a tiny run of a few hundred
    # steps needs a larger step to get there (the sign update then hovers within +-1e-2).
    moe.bias_update_rate = 1e-2 if preset == "tiny" else 1e-3
    config.model.moe_layers.first_dense_layers = 1
    return config
