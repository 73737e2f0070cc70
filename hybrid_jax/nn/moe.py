r"""Mixture-of-experts feed-forward layer (`model.ffn = "moe"`) and the feed-forward registry.

    MoE(x) = sum_{i<k} w_i(x) FFN_{I_i(x)}(x)  +  SharedFFN(x)

E routed SwiGLU experts of hidden width h (`mlp_dim`), top-k routing by a softmax (Mixtral) or
sigmoid (DeepSeek-V3) router, and `num_shared_experts` experts every token passes through (one
SwiGLU of width `num_shared_experts * h`). The routing, dispatch paths and statistics are in
`hybrid_jax.nn.routing`. Each call returns `(y, stats)`:

    stats = {"load" [E], "aux_loss", "z_loss", "dropped", "penalty"}
    penalty = aux_loss_weight * aux_loss + z_loss_weight * z_loss     (added to the training loss)

Auxiliary-loss-free balancing (DeepSeek-V3): with `bias_update_rate > 0` the layer holds a
per-expert bias b `[E]` added to the scores for the choice only. It is an `ExpertBias` variable,
not an `nnx.Param`, so no optimiser sees it; the train step updates it after each step from the
step's load f:

    b <- b + bias_update_rate * sign(mean_e f_e - f)

(under-loaded experts become more attractive). Parameters: E * 3 d h routed + 3 d (S h) shared +
d E router; active per token: k * 3 d h + 3 d S h + d E.

Decoding (`prefill`, `decode`) always uses the dropless path: inference never drops a token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_jax.checks import check_choice, check_int, check_number, fail
from hybrid_jax.nn import routing
from hybrid_jax.nn.common import WEIGHT, Dense, _sharding_key, logical_param
from hybrid_jax.nn.mlp import SwiGLU

ConfigDict = ml_collections.ConfigDict
FFN_KINDS = ("swiglu", "moe", "none")


class ExpertBias(nnx.Variable):
    """The auxiliary-loss-free balancing bias: state that the train step updates from the expert
    loads, never from the gradient (and so invisible to the optimiser, which sees `nnx.Param`)."""


def default_moe_config() -> ConfigDict:
    """The `model.moe` section: every key the MoE layer reads."""
    return ConfigDict({
        "num_experts": 8,
        "experts_per_token": 2,  # top-k
        "num_shared_experts": 0,
        "mlp_dim": 128,  # hidden width of one expert (routed and shared)
        "router": "softmax",  # or "sigmoid"
        "normalize_weights": True,  # the k weights of a token sum to 1 (before routed_scaling_factor)
        "routed_scaling_factor": 1.0,
        "aux_loss_weight": 0.0,  # load-balancing loss (Switch / GShard)
        "z_loss_weight": 0.0,  # router z-loss (ST-MoE)
        "bias_update_rate": 0.0,  # > 0: auxiliary-loss-free balancing (DeepSeek-V3)
        "dispatch": "dropless",  # "dropless" (ragged_dot), "capacity" (static shapes), "dense" (reference)
        "capacity_factor": 1.25,  # capacity path: C = ceil(capacity_factor N k / E)
    })


def check_moe_config(cfg: ConfigDict, prefix: str = "model.moe") -> None:
    """Raises the one error format, naming the bad key of the `model.moe` section."""
    extra = sorted(set(cfg.keys()) - set(default_moe_config().keys()))
    if extra:
        fail(f"{prefix}.{extra[0]}", f"unknown key; valid keys are {sorted(default_moe_config().keys())}")
    if cfg.num_shared_experts and not cfg.num_experts:
        fail(f"{prefix}.num_experts", f"is 0 but num_shared_experts={cfg.num_shared_experts}: shared experts "
             "need at least one routed expert (for a dense FFN use model.ffn = 'swiglu')")
    num_experts = check_int(cfg, "num_experts", prefix=prefix)
    k = check_int(cfg, "experts_per_token", prefix=prefix)
    if k > num_experts:
        fail(f"{prefix}.experts_per_token", f"{k} must be <= num_experts ({num_experts})")
    check_int(cfg, "num_shared_experts", minimum=0, prefix=prefix)
    check_int(cfg, "mlp_dim", prefix=prefix)
    check_choice(cfg, "router", routing.ROUTERS, prefix=prefix)
    check_choice(cfg, "normalize_weights", (True, False), prefix=prefix)
    check_choice(cfg, "dispatch", routing.DISPATCHES, prefix=prefix)
    check_number(cfg, "routed_scaling_factor", low=0, low_inclusive=False, prefix=prefix)
    for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        check_number(cfg, key, low=0, prefix=prefix)
    check_number(cfg, "capacity_factor", low=0, low_inclusive=False, prefix=prefix)


class ExpertKernel(nnx.Module):
    """One weight matrix per expert, `kernel [E, d_in, d_out]` (applied by `hybrid_jax.nn.routing`)."""

    def __init__(self, experts: int, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs):
        # lecun-normal over each expert's fan-in, as Dense does for the dense SwiGLU.
        value = jax.random.normal(rngs.params(), (experts, d_in, d_out), jnp.float32) / math.sqrt(d_in)
        self.kernel = logical_param(value, ("expert", *axes), role=WEIGHT)


class MoE(nnx.Module):
    """Routed + shared SwiGLU experts on `[B, T, d_model]` (see the module docstring)."""

    def __init__(self, cfg: ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        check_moe_config(cfg)
        self.num_experts, self.k = cfg.num_experts, cfg.experts_per_token
        self.router_kind, self.normalize = cfg.router, cfg.normalize_weights
        self.scale, self.dispatch = cfg.routed_scaling_factor, cfg.dispatch
        self.capacity_factor, self.bias_update_rate = cfg.capacity_factor, cfg.bias_update_rate
        self.aux_loss_weight, self.z_loss_weight = cfg.aux_loss_weight, cfg.z_loss_weight
        experts, hidden = cfg.num_experts, cfg.mlp_dim
        self.router = Dense(d_model, experts, ("embed", None), rngs=rngs)
        self.gate = ExpertKernel(experts, d_model, hidden, ("embed", "mlp"), rngs=rngs)
        self.up = ExpertKernel(experts, d_model, hidden, ("embed", "mlp"), rngs=rngs)
        self.down = ExpertKernel(experts, hidden, d_model, ("mlp", "embed"), rngs=rngs)
        shared = cfg.num_shared_experts * hidden
        self.shared = SwiGLU(d_model, shared, rngs=rngs) if shared else None
        self.balance_bias = nnx.data(None)  # a Variable when balancing is on: data, not static
        if cfg.bias_update_rate > 0:
            self.balance_bias = ExpertBias(jnp.zeros((experts,), jnp.float32), role="no_decay",
                                           **{_sharding_key(): ("expert",), "eager_sharding": False})

    def _kernels(self, dtype) -> routing.ExpertKernels:
        return routing.ExpertKernels(*(w.kernel[...].astype(dtype) for w in (self.gate, self.up, self.down)))

    def __call__(self, x: jax.Array, *, dispatch: str | None = None) -> tuple[jax.Array, dict]:
        """`(y [B, T, d], stats)`; `dispatch` overrides the configured path (decoding, tests)."""
        dispatch = dispatch or self.dispatch
        batch_shape, d_model = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d_model)
        bias = None if self.balance_bias is None else self.balance_bias[...]
        plan = routing.route(self.router(flat), k=self.k, router=self.router_kind,
                             normalize=self.normalize, scale=self.scale, bias=bias)
        kernels = self._kernels(x.dtype)
        dropped = jnp.zeros((), jnp.float32)
        if dispatch == "dropless":
            y = routing.dropless(flat, plan, kernels)
        elif dispatch == "capacity":
            y, dropped = routing.capacity(flat, plan, kernels, capacity_factor=self.capacity_factor)
        else:
            y = routing.dense_reference(flat, plan, kernels)
        if self.shared is not None:
            y = y + self.shared(flat)
        stats = routing.routing_stats(plan, self.num_experts)
        stats["dropped"] = dropped
        stats["penalty"] = self.aux_loss_weight * stats["aux_loss"] + self.z_loss_weight * stats["z_loss"]
        return y.reshape(*batch_shape, d_model), stats

    def update_bias(self, load: jax.Array) -> None:
        """b <- b + rate * sign(mean(f) - f) over the last axis of `load` (stacked layers allowed)."""
        if self.balance_bias is None:
            return
        mean = jnp.mean(load, axis=-1, keepdims=True)
        self.balance_bias[...] = self.balance_bias[...] + self.bias_update_rate * jnp.sign(mean - load)

    @staticmethod
    def param_count(cfg: ConfigDict, d_model: int, *, active: bool = False) -> int:
        """Parameters of the layer, or (active) those one token uses: k routed experts, not E."""
        routed = cfg.experts_per_token if active else cfg.num_experts
        per_expert = SwiGLU.param_count(d_model, cfg.mlp_dim)
        return (routed + cfg.num_shared_experts) * per_expert + d_model * cfg.num_experts

    @staticmethod
    def flops_per_token(cfg: ConfigDict, d_model: int) -> int:
        """Forward FLOPs of one token: the router and the k routed + shared experts it runs."""
        return 2 * MoE.param_count(cfg, d_model, active=True)


class DenseFFN(SwiGLU):
    """The SwiGLU block with the MoE call signature: `(y, None)`."""

    def __call__(self, x: jax.Array, *, dispatch: str | None = None) -> tuple[jax.Array, None]:
        return super().__call__(x), None


def build_ffn(kind: str, model_cfg: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """The feed-forward layer of one block: `kind` in FFN_KINDS ("none" -> None)."""
    if kind == "moe":
        return MoE(model_cfg.moe, model_cfg.d_model, rngs=rngs)
    if kind == "swiglu":
        return DenseFFN(model_cfg.d_model, model_cfg.mlp_dim, rngs=rngs)
    return None


def ffn_flops_per_token(kind: str, model_cfg: ConfigDict) -> int:
    if kind == "moe":
        return MoE.flops_per_token(model_cfg.moe, model_cfg.d_model)
    return SwiGLU.flops_per_token(model_cfg.d_model, model_cfg.mlp_dim) if kind == "swiglu" else 0


def ffn_active_params(kind: str, model_cfg: ConfigDict) -> int:
    if kind == "moe":
        return MoE.param_count(model_cfg.moe, model_cfg.d_model, active=True)
    return SwiGLU.param_count(model_cfg.d_model, model_cfg.mlp_dim) if kind == "swiglu" else 0


__all__ = ["FFN_KINDS", "DenseFFN", "ExpertBias", "ExpertKernel", "MoE", "build_ffn", "check_moe_config",
           "default_moe_config", "ffn_active_params", "ffn_flops_per_token"]
