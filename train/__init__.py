"""Training: mesh, input pipeline, sharded jitted steps, checkpoints, logs and evaluation."""

from train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
