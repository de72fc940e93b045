"""Workdir paths: `etils.epath.Path`, so a workdir may be local or a bucket (`gs://b/run`).

Everything under a workdir (checkpoints, metrics.jsonl, the TensorBoard folder, the tokenizer
file, eval results) is reached through `workdir_path(workdir) / name`, never `os.path`, which
would mangle a URI (`os.path.abspath("gs://b/run")` is "<cwd>/gs:/b/run"). gs:// needs gcsfs
(`pip install -e .[gcs]`) or TensorFlow.
"""

from __future__ import annotations

import os

from etils import epath

__all__ = ["workdir_path"]


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """`workdir` as an absolute epath.Path (a relative local path is taken from the current
    folder; a URI is already absolute — pathlib's `absolute()` would prefix the cwd)."""
    path = epath.Path(workdir)
    return path if path.is_absolute() else path.absolute()
