"""Orbax checkpoints of the training state and of what a resume must agree with.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items:
  state: {"params", "opt_state", "step"} (arrays, restored onto the current mesh's shardings)
  meta:  {"config", "tokenizer", "fingerprint", "step"} (JSON)
Orbax writes into a temporary folder and renames it when complete, so a run killed at any
moment — mid-save included — resumes from its last complete checkpoint.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError"]


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not match this run."""


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 2, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"workdir {workdir!r} has no checkpoints folder")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        return step

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self._check_step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return step, dict(out["meta"])

    def restore(self, step: int | None, abstract_state) -> tuple[int, dict, dict]:
        """Restore (step, state, meta); `abstract_state` carries the target shardings."""
        step = self._check_step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
