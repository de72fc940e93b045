"""Causal softmax attention (grouped-query, sliding window, packing, cache positions)."""

from pallas_kernels.attention.ops import attention, attention_mask

__all__ = ["attention", "attention_mask"]
