"""Tiny run configs shared by the training tests."""
import os

from hybrid_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "experiments", "configs", "transformer.py") + ":tiny"

# The shape every training test uses (CPU compile time dominates: keep them all alike).
RUN = dict(seq_len=32, batch_size=8, steps=6, warmup_steps=1, log_every=1, eval_every=100,
           eval_steps=2, checkpoint_every=3)


def tiny_config(corpus: str, *, mesh=(-1, 1, 1, 1, 1), **train):
    """The tiny transformer on `corpus` (bytes) with RUN's train settings, overridden by `train`."""
    config = load_config(TINY)
    config.data.source, config.data.tokenizer = corpus, "byte"
    for key, value in {**RUN, **train}.items():
        setattr(config.train, key, value)
    config.mesh.shape = mesh
    return config


def config_overrides(corpus: str, **train) -> list[str]:
    """The same config as command-line flags for `python -m hybrid_jax.train`."""
    flags = [f"--config={TINY}", f"--config.data.source={corpus}", "--config.data.tokenizer=byte"]
    return flags + [f"--config.train.{key}={value}" for key, value in {**RUN, **train}.items()]
