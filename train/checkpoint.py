"""Orbax checkpoints of the training state and of what a resume must agree with.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items:
  state: {"params", "opt_state", "step"} (arrays, restored onto the current mesh's shardings)
  meta:  {"config", "tokenizer", "fingerprint", "step"} (JSON)
A tokenizer file (HuggingFace JSON) is stored once beside them, `checkpoints/tokenizer.json`,
and `meta["tokenizer"]` holds {"type": "hf", "name", "file": "tokenizer.json", "sha256"}: the
run no longer needs the user's file, and a changed copy is detected by its hash.
Orbax writes into a temporary folder and renames it when complete, so a run killed at any
moment — mid-save included — resumes from its last complete checkpoint.

Paths are `etils.epath.Path`s, so a workdir may be a bucket (`gs://bucket/run`, with the `gcs`
extra installed). Several processes: every one calls save/restore (orbax coordinates them, and
the primary host writes the shared files); the tokenizer file is written by process 0 alone.
"""

from __future__ import annotations

import hashlib
import os

import jax
import orbax.checkpoint as ocp

from train.data.tokenizer import tokenizer_from_dict
from train.paths import workdir_path

__all__ = ["Checkpointer", "CheckpointError", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not match this run."""


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, create: bool = True):
        self.workdir = workdir_path(workdir)
        self.directory = self.workdir / "checkpoints"
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"workdir {os.fspath(workdir)!r} has no checkpoints folder")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def store_tokenizer(self, tokenizer) -> dict:
        """Write the tokenizer file once (atomically, on process 0 only: the workdir is shared)
        and return its reference for the meta; tokenizers without a file (bytes, ids) are
        returned as their dict."""
        d = tokenizer.to_dict()
        if d.get("type") != "hf":
            return d
        data = d["json"].encode("utf-8")
        path = self.directory / TOKENIZER_FILE
        if jax.process_index() == 0 and not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(TOKENIZER_FILE + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # a reader never sees half a file
        return {"type": "hf", "name": d.get("name", ""), "file": TOKENIZER_FILE,
                "sha256": hashlib.sha256(data).hexdigest()}

    def load_tokenizer(self, ref: dict):
        """The tokenizer a checkpoint's meta refers to (a stored file is checked by its hash)."""
        if "file" not in ref:
            return tokenizer_from_dict(ref)
        path = self.directory / ref["file"]
        if not path.is_file():
            raise CheckpointError(f"the run's tokenizer file {path} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise CheckpointError(f"the run's tokenizer file {path} was changed (sha256 differs "
                                  f"from the one recorded at training time)")
        return tokenizer_from_dict({"type": "hf", "name": ref.get("name", ""),
                                    "json": data.decode("utf-8")})

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
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:  # orbax: a tree or shape mismatch
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit this "
                                  f"model ({first}); use a new --workdir") from None
        return step, out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
