"""Orbax checkpoints of the whole run: train state (step, params, optimiser) + data-iterator position.

    <workdir>/checkpoints/<step>/state/      params, opt_state, step   (orbax PyTree, sharded arrays)
                                             (+ buffers: the MoE balancing biases, when the model has any)
    <workdir>/checkpoints/<step>/data_iter/  process_<i>-of-<n>.json   (grain iterator state, per process)

A checkpoint is written every `train.checkpoint_every` steps, on SIGTERM, and at the end; the newest
`train.keep_checkpoints` are kept. Writes are asynchronous (training continues while arrays are
written) and atomic: orbax writes into a temporary directory and renames it when every process has
finished, so a run killed mid-write leaves the previous checkpoint as the newest one, and the
leftover temporary directory is removed by the next run.

Restoring takes an abstract target, `jax.ShapeDtypeStruct`s carrying the shardings of the *current*
mesh, so a checkpoint written on one mesh (or number of hosts) loads onto another; each device
reads only its own shards. The data iterator is restored per process and needs the same number of
processes as the run that wrote it.
"""
from __future__ import annotations

import os
import re

import grain
import jax
import orbax.checkpoint as ocp

from hybrid_jax.train.step import TrainState

_ITER_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class Checkpointer:
    """Saves and restores `(TrainState, data iterator)` pairs under `directory`."""

    def __init__(self, directory: str, *, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator) -> bool:
        """Starts writing a checkpoint at `step`; False (nothing written) if `step` is already saved.

        `data_iter` must have yielded exactly the batches that produced `state`: its position is
        read now, the arrays are written in the background.
        """
        if step in self._manager.all_steps(read=False):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state.as_dict()),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: TrainState, data_iter: grain.DatasetIterator) -> TrainState:
        """The state at `step`, placed by the shardings in `abstract_state`; moves `data_iter` to its position."""
        self.check_process_count(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state.as_dict()),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
        )
        restored = self._manager.restore(step, args=args)
        return TrainState.from_dict(restored["state"])

    def check_process_count(self, step: int) -> None:
        """ValueError unless the checkpoint at `step` was written by as many processes as this run has."""
        folder = os.path.join(self.directory, str(step), "data_iter")
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint {os.path.dirname(folder)} has no data_iter/ item; it was not "
                             "written by hybrid_jax.train")
        counts = {int(m.group(2)) for name in os.listdir(folder) if (m := _ITER_FILE.match(name))}
        if counts and jax.process_count() not in counts:
            raise ValueError(
                f"checkpoint {folder} holds the data-iterator positions of {sorted(counts)} "
                f"process(es) but this run has {jax.process_count()}; resume with the same number "
                "of processes (the mesh may differ)"
            )

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk (call before exiting)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


__all__ = ["Checkpointer"]
