"""hybrid_jax: sequence mixers and the hybrid language models built from them."""

__version__ = "0.1.0"
