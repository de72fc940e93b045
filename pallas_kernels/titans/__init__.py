"""Titans neural long-term memory (Behrouz et al., "Titans: Learning to Memorize at Test Time").

A per-head memory (linear map or bias-free MLP) trained online by gradient descent with momentum
and forgetting on the loss ||M(k_t) - v_t||^2, read with q_t. ``titans`` runs a sequence
("reference" token scan or "chunked" block-parallel form), ``titans_step`` one decoding token.
"""

from pallas_kernels.titans.ops import init_state, memory_names, titans, titans_step
from pallas_kernels.titans.reference import ACTIVATIONS

__all__ = ["titans", "titans_step", "init_state", "memory_names", "ACTIVATIONS"]
