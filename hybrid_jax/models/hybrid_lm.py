r"""HybridLM: a decoder-only language model whose layers follow a pattern of mixers.

    h_0 = Embed(tokens)                                          [B, T, d]   (cast to model.dtype)
    for layer l (mixer m_l = model.mixers[pattern[l mod P]]):
        h <- h + m_l(RMSNorm(h))
        h <- h + SwiGLU(RMSNorm(h))                              (skipped when model.ffn = "none")
    logits = RMSNorm(h) E^T  (tied)  or  RMSNorm(h) W_out        [B, T, vocab]  float32

Depth is folded: the P blocks of one pattern period form a `Period` module, and `num_layers / P`
copies of it are created with `nnx.vmap` (parameters stacked on a leading "layers" axis) and applied
with `nnx.scan`, so the compiled program holds one period whatever the depth. `model.remat`
rematerialises each period in the backward pass ("full": save only the period input; "save_dots":
also keep matmul outputs without batch dims).

Decoding will thread one cache per block through the same scan (a later addition); the blocks keep
`mixer` and `ffn` separate so a cache can be attached to the mixer alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_jax.config import layer_pattern, validate_model
from hybrid_jax.nn import Dense, Embed, RMSNorm, SwiGLU, build_mixer
from hybrid_jax.nn.common import ModuleList

# model.remat -> what a rematerialised period keeps for the backward pass (None: no remat).
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_STACK = {nnx.PARTITION_NAME: "layers"}


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(
        self, mixer_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs
    ):
        d_model, eps = model_cfg.d_model, model_cfg.norm_eps
        self.mixer_norm = RMSNorm(d_model, eps=eps)
        self.mixer = build_mixer(mixer_cfg, d_model, rngs=rngs)
        if model_cfg.ffn == "swiglu":
            self.ffn_norm = RMSNorm(d_model, eps=eps)
            self.ffn = SwiGLU(d_model, model_cfg.mlp_dim, rngs=rngs)
        else:
            self.ffn_norm, self.ffn = None, None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.mixer(self.mixer_norm(x))
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class Period(nnx.Module):
    """One period of the layer pattern: a block per pattern letter, applied in order."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, mixers: dict, *, rngs: nnx.Rngs):
        self.blocks = ModuleList(
            [Block(mixers[letter], model_cfg, rngs=rngs) for letter in model_cfg.pattern]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class HybridLM(nnx.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab]` (see the module docstring)."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        mixers = validate_model(model_cfg)
        self.vocab_size, self.d_model = model_cfg.vocab_size, model_cfg.d_model
        self.pattern, self.num_layers = model_cfg.pattern, model_cfg.num_layers
        self.layer_letters = tuple(layer_pattern(model_cfg))
        self.num_periods = model_cfg.num_layers // len(model_cfg.pattern)
        self.dtype_name, self.remat = model_cfg.dtype, model_cfg.remat

        self.embed = Embed(model_cfg.vocab_size, model_cfg.d_model, rngs=rngs)

        @nnx.split_rngs(splits=self.num_periods)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK)
        def stacked_periods(rngs: nnx.Rngs) -> Period:
            return Period(model_cfg, mixers, rngs=rngs)

        self.periods = stacked_periods(rngs)
        self.final_norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps)
        if model_cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(model_cfg.d_model, model_cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    def _apply_periods(self, x: jax.Array) -> jax.Array:
        def run_period(period: Period, h: jax.Array) -> jax.Array:
            return period(h)

        if self.remat != "none":
            run_period = nnx.remat(run_period, policy=CHECKPOINT_POLICIES[self.remat])

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=_STACK)
        def scan_periods(h: jax.Array, period: Period) -> jax.Array:
            return run_period(period, h)

        return scan_periods(x, self.periods)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"HybridLM: tokens must be an integer array [B, T], got {tokens.dtype}{list(tokens.shape)}"
            )
        x = self.embed(tokens, jnp.dtype(self.dtype_name))
        x = self.final_norm(self._apply_periods(x))
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x).astype(jnp.float32)


def build_model(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> HybridLM:
    """Validates `model_cfg` (the `model` section of a config) and builds the model."""
    return HybridLM(model_cfg, rngs=rngs)
