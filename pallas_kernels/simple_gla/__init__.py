"""simple_gla: S_t = exp(g_t)·S_{t-1} + k_t v_tᵀ, o_t = scale·S_tᵀ q_t — and Mamba-2's SSD on top.

One folder, one op: ``reference.py`` (token scan, the specification), ``chunked.py`` (pure JAX,
the CPU default), ``gpu.py`` + ``triton_kernels.py`` (Triton through jax-triton), ``tpu.py`` (Pallas Mosaic TPU), ``ops.py`` (the
public function: checks, implementation choice, custom_vjp), ``ssd.py`` (Mamba-2 through it).
"""

from pallas_kernels.simple_gla.ops import simple_gla, simple_gla_step
from pallas_kernels.simple_gla.ssd import ssd, ssd_step

__all__ = ["simple_gla", "simple_gla_step", "ssd", "ssd_step"]
