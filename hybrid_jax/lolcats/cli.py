"""Command lines of the LoLCATs stages, flag-compatible with `python -m hybrid_jax.train`:

    python -m hybrid_jax.lolcats.transfer --config experiments/configs/lolcats.py:smollm2 [--workdir DIR]
        [--config.transfer.steps=20 ...]

`--config` is an ml_collections config file whose `get_config(preset)` returns a
`hybrid_jax.lolcats.config` config; `--config.KEY=VALUE` overrides one key. Exit status 2 for a bad
config (reported before anything loads).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from hybrid_jax.lolcats.config import validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "LoLCATs config: path/to/file.py[:preset], e.g. experiments/configs/lolcats.py:smollm2")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")
flags.mark_flags_as_required(["config"])

EXIT_BAD_CONFIG = 2


def run(stage: Callable) -> None:
    """Parses the flags and runs `stage(config)` (the process exits with main's status)."""

    def main(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; options go as --flag=value")
        if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
            absl_logging.set_verbosity(absl_logging.WARNING)
        config = _CONFIG.value
        try:
            if _WORKDIR.value:
                config.workdir = _WORKDIR.value
            validate(config)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        stage(config)
        return 0

    app.run(main)
