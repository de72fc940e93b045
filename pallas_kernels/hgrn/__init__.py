"""HGRN's elementwise gated recurrence: reference scan and chunked associative scan."""

from pallas_kernels.hgrn.ops import hgrn, hgrn_step

__all__ = ["hgrn", "hgrn_step"]
