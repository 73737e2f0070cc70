"""Flax NNX layers: norms, short conv, RoPE, MLP and the mixer layers, registered by kind.

Importing this package imports every module in `MIXER_MODULES`, whose `@register_mixer` decorators
fill `MIXERS`. A new mixer module is added by appending its name to `MIXER_MODULES` (see
`hybrid_jax.nn.registry` for the interface).

The modules form a star: a mixer layer module (attention, mla, linear_attention, mamba, delta,
rg_lru, sparse_attention, qla, lolcats) imports only shared modules, never another mixer layer module
(tests/nn/test_layout.py checks it):

    common        logical_param (axes + weight-decay role), Dense, Embed, activations
    registry      the Mixer interface and the kind -> class registry
    layer_config  config checks and derived sizes of the mixer layers
    linear_mixer  LinearMixer base class, RecurrentCache, decoding helpers
    kv_cache      KVCache, ring buffers and attended-key counts of the attention layers
    log_linear    LogLinearMixin: Fenwick-tree states for a linear mixer (no layer of its own)
    initializers  dt_bias / A_log initialisers
    conv, norms, rope, mlp   ShortConv and ConvProjection, RMSNorm variants, RoPE, SwiGLU
    lora          LoRADense, the q/k/v/o projections of attention-like layers (biases, adapters)
    moe, routing  the feed-forward kinds (FFN_KINDS, build_ffn), the MoE layer and its routing
"""

import importlib

from hybrid_jax.nn.common import (
    ACTIVATIONS,
    Dense,
    Embed,
    activation,
    count_params,
    logical_axes,
    logical_param,
    param_roles,
)
from hybrid_jax.nn.conv import ShortConv
from hybrid_jax.nn.mlp import SwiGLU
from hybrid_jax.nn.moe import FFN_KINDS, ExpertBias, MoE, build_ffn
from hybrid_jax.nn.norms import GatedRMSNorm, RMSNorm, l2_normalize, rms_normalize
from hybrid_jax.nn.registry import (
    MIXERS,
    Mixer,
    build_mixer,
    get_mixer,
    mixer_config,
    register_mixer,
    resolve_mixer_config,
)
from hybrid_jax.nn.rope import apply_rope

# Modules under hybrid_jax/nn/ that define mixer layers; importing one registers its kinds.
MIXER_MODULES: tuple[str, ...] = (
    "attention",
    "mla",
    "linear_attention",
    "mamba",
    "delta",
    "rg_lru",
    "sparse_attention",
    "qla",
    "lolcats",
)

for _name in MIXER_MODULES:
    importlib.import_module(f"hybrid_jax.nn.{_name}")
del _name

__all__ = [
    "ACTIVATIONS",
    "Dense",
    "Embed",
    "ExpertBias",
    "FFN_KINDS",
    "GatedRMSNorm",
    "MIXERS",
    "MIXER_MODULES",
    "Mixer",
    "MoE",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "activation",
    "apply_rope",
    "build_ffn",
    "build_mixer",
    "count_params",
    "get_mixer",
    "l2_normalize",
    "logical_axes",
    "logical_param",
    "mixer_config",
    "param_roles",
    "register_mixer",
    "resolve_mixer_config",
    "rms_normalize",
]
