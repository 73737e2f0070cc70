"""Training: mesh and sharding rules, optimiser, jitted steps, orbax checkpoints, metrics, the loop.

    python -m hybrid_jax.train --config experiments/configs/kimi_linear.py:tiny --workdir runs/x \\
        --config.train.steps=500

    from hybrid_jax.config import load_config
    from hybrid_jax.train import train
    result = train(load_config("experiments/configs/transformer.py:tiny"), "runs/x")
    print(result.summary())
"""
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.loop import ConfigError, NonFiniteLossError, TrainResult, initialize_distributed, train
from hybrid_jax.train.mesh import axis_rules, logical_to_mesh_spec, make_mesh, tree_shardings
from hybrid_jax.train.metrics import MetricsBuffer, MetricsLogger, plot_accuracy_curve, plot_loss_curve, read_metrics
from hybrid_jax.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from hybrid_jax.train.state import TrainSetup, build_train_setup
from hybrid_jax.train.step import TrainState, cross_entropy_loss, make_eval_step, make_train_step

__all__ = [
    "Checkpointer",
    "ConfigError",
    "MetricsBuffer",
    "MetricsLogger",
    "NonFiniteLossError",
    "TrainResult",
    "TrainSetup",
    "TrainState",
    "axis_rules",
    "build_train_setup",
    "cross_entropy_loss",
    "initialize_distributed",
    "learning_rate_schedule",
    "logical_to_mesh_spec",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "plot_accuracy_curve",
    "plot_loss_curve",
    "read_metrics",
    "train",
    "tree_shardings",
    "weight_decay_mask",
]
