"""Language models built from the mixer layers: `build_model(config.model, rngs=nnx.Rngs(0))`."""

from hybrid_jax.models.hybrid_lm import CHECKPOINT_POLICIES, Block, HybridLM, Period, build_model

__all__ = ["CHECKPOINT_POLICIES", "Block", "HybridLM", "Period", "build_model"]
