"""DeepSeek-V3-style model: MLA attention (with decoupled RoPE) in every layer and fine-grained
mixture-of-experts feed-forward layers after the first dense ones.

DeepSeek-V3 (2024): Multi-head Latent Attention (low-rank KV cache, a RoPE part of the query/key
heads), dense FFNs in the first layers, then MoE layers with many narrow routed experts and one
shared expert, a sigmoid router whose top-k weights are normalised and scaled by a routed scaling
factor (2.5), auxiliary-loss-free balancing (a per-expert bias on the choice, updated by 1e-3 *
sign(mean load - load) after each step) and a very small sequence-wise balance loss (here the
batch-wise one, weight 1e-4). Experts are a quarter of the dense width, so k + 1 = 3 of them
(tiny) stay below one dense FFN.
"""

from hybrid_jax.config import mixer, preset_config


SIZES = {
    "tiny": dict(num_layers=4, heads=4, head_dim=16, rope_dim=8, q_lora=0, kv_lora=32, first_dense=1,
                 experts=8, top_k=2),
    "small": dict(num_layers=12, heads=4, head_dim=64, rope_dim=32, q_lora=256, kv_lora=128, first_dense=1,
                  experts=32, top_k=4),
    "base": dict(num_layers=12, heads=12, head_dim=64, rope_dim=32, q_lora=512, kv_lora=256, first_dense=3,
                 experts=64, top_k=4),
}


def get_config(preset: str = "tiny"):
    config = preset_config(preset)
    size = SIZES[preset]
    config.model.num_layers = size["num_layers"]
    config.model.pattern = "M"
    config.model.mixers = {
        "M": mixer("mla", num_heads=size["heads"], q_lora_rank=size["q_lora"], kv_lora_rank=size["kv_lora"],
                   qk_nope_head_dim=size["head_dim"], qk_rope_head_dim=size["rope_dim"],
                   v_head_dim=size["head_dim"]),
    }
    config.model.ffn = "moe"
    moe = config.model.moe
    moe.num_experts, moe.experts_per_token = size["experts"], size["top_k"]
    moe.num_shared_experts = 1
    moe.mlp_dim = config.model.mlp_dim // 4
    moe.router = "sigmoid"
    moe.normalize_weights = True
    moe.routed_scaling_factor = 2.5
    moe.bias_update_rate = 1e-3
    moe.aux_loss_weight = 1e-4
    config.model.moe_layers.first_dense_layers = size["first_dense"]
    return config
