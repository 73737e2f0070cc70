r"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer"; Llama's FFN).

    FFN(x) = (SiLU(x W_gate) * (x W_up)) W_down,   W_gate, W_up: [d_model, hidden], W_down: [hidden, d_model]

Parameters: 3 * d_model * hidden. Forward FLOPs per token: 6 * d_model * hidden.
"""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.nn.common import Dense


class SwiGLU(nnx.Module):
    """Gated SiLU MLP on `[..., d_model]`."""

    def __init__(self, d_model: int, hidden_dim: int, *, rngs: nnx.Rngs):
        if hidden_dim < 1:
            raise ValueError(f"SwiGLU: hidden_dim must be >= 1, got {hidden_dim}")
        self.d_model, self.hidden_dim = d_model, hidden_dim
        self.gate = Dense(d_model, hidden_dim, ("embed", "mlp"), rngs=rngs)
        self.up = Dense(d_model, hidden_dim, ("embed", "mlp"), rngs=rngs)
        self.down = Dense(hidden_dim, d_model, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    @staticmethod
    def param_count(d_model: int, hidden_dim: int) -> int:
        return 3 * d_model * hidden_dim

    @staticmethod
    def flops_per_token(d_model: int, hidden_dim: int) -> int:
        return 2 * SwiGLU.param_count(d_model, hidden_dim)
