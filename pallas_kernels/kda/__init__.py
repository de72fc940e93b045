"""KDA (Kimi Delta Attention): gated delta rule with a per-key-channel decay; reference scan
and chunked JAX."""

from pallas_kernels.kda.ops import OP, kda, kda_step

__all__ = ["OP", "kda", "kda_step"]
