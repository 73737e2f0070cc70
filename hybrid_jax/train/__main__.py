"""Command line: `python -m hybrid_jax.train --config FILE.py[:PRESET] --workdir DIR [--config.KEY=VALUE ...]`.

    python -m hybrid_jax.train --config experiments/configs/kimi_linear.py:tiny --workdir runs/x \\
        --config.train.steps=500 --config.mesh.shape='(-1, 1, 1, 1, 1)'

Rerunning the same command resumes from the newest checkpoint in the workdir. Several processes
(one per host, or several on one machine) join through --coordinator_address host:port,
--num_processes and --process_id, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables.

Exit status: 0 when the run completed or was preempted (SIGTERM: a checkpoint was saved; rerun to
resume), 1 when the loss became NaN/inf (the newest checkpoint is the last good one), 2 for a bad
config or data path (reported before anything compiles).
"""
from __future__ import annotations

import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from hybrid_jax.train.loop import ConfigError, NonFiniteLossError, initialize_distributed, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config: path/to/file.py[:preset], e.g. experiments/configs/kimi_linear.py:tiny"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.train.workdir)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.mark_flags_as_required(["config"])

EXIT_NON_FINITE_LOSS = 1
EXIT_BAD_CONFIG = 2


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options go as --flag=value")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    if jax.process_index() == 0:
        print(result.summary())
    return 0


if __name__ == "__main__":
    app.run(main)
