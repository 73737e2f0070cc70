"""One ml_collections config file per model family; each defines `get_config("tiny"|"small"|"base")`
and `MIXER_KINDS` (the mixer kinds it uses). Load one with
`hybrid_jax.config.load_config("experiments/configs/<family>.py:<preset>")`.
"""
