"""Orbax checkpoints: keep-N, restore straight into the target shardings, save on SIGTERM."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored; the message names it and says what to do."""


class Checkpointer:
    """Wraps `ocp.CheckpointManager` for one pytree state (arrays only)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores into the shapes, dtypes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        where = os.path.join(self.directory, str(step))
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax/tensorstore raise many types for bad files
            raise CheckpointError(
                f"checkpoint {where} cannot be restored ({type(e).__name__}: {e}). It is corrupt "
                "or was written by a different model/config. Delete that step folder to resume "
                "from an earlier one, or use a fresh --workdir.") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class StopSignal:
    """Turns SIGTERM (preemption) into a flag the training loop polls to save and exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, as a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state)
