"""Synthetic recall tasks, usable as training data and as evaluations."""

from train.tasks.mqar import MQAR_SUITE, MqarSpec, make_mqar, mqar_accuracy
from train.tasks.passkey import make_passkey_prompt

__all__ = ["MQAR_SUITE", "MqarSpec", "make_mqar", "mqar_accuracy", "make_passkey_prompt"]
