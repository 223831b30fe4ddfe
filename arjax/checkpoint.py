"""Orbax checkpoints: keep-N, restore straight into the target shardings, save on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

import orbax.checkpoint as ocp

from arjax.errors import UserError


class CheckpointError(UserError, RuntimeError):
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
            with _quiet_orbax():
                return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax/tensorstore raise many types for bad files
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint {where} cannot be restored ({type(e).__name__}: {reason}). It is "
                "corrupt or was written by a different model/config; use a fresh --workdir "
                "or delete that step folder.") from None

    def restore_newest_intact(self, abstract_state: Any) -> Any:
        """Restores the newest step that reads back (keep-N keeps earlier ones). Unreadable
        newer steps are said once and moved aside to `<step>.corrupt` (kept for inspection;
        the run will write those steps again); a CheckpointError when no step is readable."""
        errors, bad = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(abstract_state, step)
            except CheckpointError as e:
                errors.append(str(e))
                bad.append(step)
                continue
            if errors:
                for b in bad:
                    where = os.path.join(self.directory, str(b))
                    os.replace(where, f"{where}.corrupt")
                self.manager.reload()
                print(f"{errors[0]}\n-> resuming from step {step}, the newest intact "
                      f"checkpoint (moved aside: {[f'{b}.corrupt' for b in bad]})",
                      file=sys.stderr)
            return state
        raise CheckpointError(errors[0] if len(errors) == 1 else
                              f"no checkpoint in {self.directory} can be restored; newest: "
                              f"{errors[0]}")

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


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every failed read of a corrupt checkpoint (tens of asyncio tracebacks)
    before raising; the raised error is reported once, by `restore`."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
