"""One ml_collections config file per model family; each defines `get_config("tiny"|"small"|"base")`
(its mixer kinds are those of `config.model.mixers`). Load one with
`hybrid_jax.config.load_config("experiments/configs/<family>.py:<preset>")`.
"""
