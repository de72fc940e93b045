"""Backbones assembled from a per-layer list of mixer names."""

from zoo.config import ConfigError, ModelConfig, hybrid_pattern
from zoo.generate import generate, sample_logits
from zoo.model import LM, Block, count_params, cross_entropy
from zoo.presets import PRESETS, preset
from zoo.registry import get_mixer, known_mixers, register_mixer

__all__ = ["ConfigError", "ModelConfig", "hybrid_pattern", "generate", "sample_logits", "LM",
           "Block", "count_params", "cross_entropy", "PRESETS", "preset", "get_mixer",
           "known_mixers", "register_mixer"]
