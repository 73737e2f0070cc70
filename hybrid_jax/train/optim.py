"""Optimiser: global-norm clipping, then AdamW under a linear-warmup + cosine-decay schedule.

    lr(s) = peak * s / W                                                   s < W   (warmup)
    lr(s) = floor + (peak - floor) * (1 + cos(pi * (s - W) / (S - W))) / 2  W <= s <= S
    floor = peak * train.min_learning_rate_ratio,  W = train.warmup_steps,  S = train.steps

Update number s = 1, ..., S (the state's step after it) uses lr(s): the first update already moves
(lr(1) = peak / W), the W-th reaches the peak and the last one uses the floor.

    g      <- g * min(1, grad_clip / ||g||_2)          (skipped when grad_clip <= 0)
    m, v   <- Adam moments (b1, b2);  u = m_hat / (sqrt(v_hat) + eps)
    theta  <- theta - lr * (u + weight_decay * mask * theta)

Weight decay follows each parameter's role, declared where the layer creates it
(`hybrid_jax.nn.logical_param(..., role=...)`, collected by `hybrid_jax.nn.param_roles`), never its
shape: "weight" (projection, conv and feature-map matrices) decays, "embedding" decays iff
`train.decay_embeddings`, "no_decay" (norm scales, biases, A_log, dt_bias, D, level weights) never.
Gradient accumulation lives in the train step (a scan over micro-batches), so one optimiser update
is one step of the schedule.
"""
from __future__ import annotations

import jax
import optax

from hybrid_jax.nn.common import EMBEDDING, ROLES, WEIGHT


def learning_rate_schedule(train_config) -> optax.Schedule:
    peak = float(train_config.learning_rate)
    floor = peak * float(train_config.min_learning_rate_ratio)
    warmup, steps = int(train_config.warmup_steps), int(train_config.steps)
    if warmup >= steps:
        raise ValueError(f"train.warmup_steps ({warmup}) must be smaller than train.steps ({steps})")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=steps, end_value=floor
    )
    # optax evaluates the schedule at the count *before* the update; shift so update s uses lr(s).
    return lambda count: schedule(count + 1)


def decays(role: str, *, decay_embeddings: bool = True) -> bool:
    """Whether a parameter with this role gets weight decay (see the module docstring)."""
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; valid roles are {list(ROLES)}")
    return role == WEIGHT or (role == EMBEDDING and decay_embeddings)


def weight_decay_mask(roles, *, decay_embeddings: bool = True):
    """A tree of bools shaped like `roles` (one role string per parameter): True where decay applies."""
    return jax.tree.map(lambda role: decays(role, decay_embeddings=decay_embeddings), roles)


def make_optimizer(train_config, roles) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for the `train` config section and the parameters' roles (a tree of role
    strings shaped like the parameters, `hybrid_jax.nn.param_roles`)."""
    schedule = learning_rate_schedule(train_config)
    adamw = optax.adamw(
        schedule,
        b1=float(train_config.b1),
        b2=float(train_config.b2),
        eps=float(train_config.adam_eps),
        weight_decay=float(train_config.weight_decay),
        mask=weight_decay_mask(roles, decay_embeddings=bool(train_config.decay_embeddings)),
    )
    clip = float(train_config.grad_clip)
    optimizer = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return optimizer, schedule


__all__ = ["decays", "learning_rate_schedule", "make_optimizer", "weight_decay_mask"]
