"""Lightning attention mixer (TransNormerLLM, Qin et al. 2023): linear attention with a fixed
per-head decay that depends on the layer's depth, an output gate and normalisation.

    q, k = SiLU(x W_q), SiLU(x W_k);  v = x W_v;  u = x W_u                 # [B, T, H, D]
    S_t = λ_h S_{t−1} + k_t v_tᵀ,  o_t = S_tᵀ q_t    (simple_gla, g = log λ_h, scale 1)
    y = (RMSNorm(o) ⊙ sigmoid(u)) W_o

Decay rule "tnl" (default): log λ_h = −slope_h, slope_h = alibi_h · (1 − l/(L−1) + 1e−5) for
layer l of L (the ratio is 0 when L = 1), alibi_h ALiBi's head slopes. Rule "fla":
log λ_h = −(8h/H)(1 − l/L). The cache is the state [B, H, D, D] (float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.common import Linear, RMSNorm, make_constant
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.simple_gla import simple_gla, simple_gla_step

__all__ = ["Lightning", "alibi_slopes", "lightning_decay"]


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes: 2^(−8(h+1)/H) for a power-of-two H; otherwise the slopes of the nearest
    lower power of two n, followed by every other slope of 2n (ALiBi's interleaving rule)."""
    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    if n_heads & (n_heads - 1) == 0:
        return pow2(n_heads)
    n = 2 ** int(math.floor(math.log2(n_heads)))
    return pow2(n) + pow2(2 * n)[0::2][: n_heads - n]


def lightning_decay(n_heads: int, layer_idx: int, n_layers: int, rule: str = "tnl") -> np.ndarray:
    """Per-head log decay g_h (<= 0) for layer `layer_idx` (0-based) of `n_layers`.

    NumPy, not jnp: the decays are constants of the architecture, computed at construction
    (which may run under `jit`)."""
    if rule == "tnl":
        ratio = 0.0 if n_layers == 1 else layer_idx / (n_layers - 1)
        return -np.asarray(alibi_slopes(n_heads)) * (1.0 - ratio + 1e-5)
    if rule == "fla":
        h = np.arange(n_heads, dtype=np.float64)
        return -(8.0 * h / n_heads) * (1.0 - layer_idx / n_layers)
    raise ValueError(f"Lightning: decay rule {rule!r} is not one of ('tnl', 'fla')")


class Lightning(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, layer_idx: int, n_layers: int,
                 decay_rule: str = "tnl", impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"Lightning: d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.h, self.d = num_heads, d_model // num_heads
        # [H] constant log decays: state (a Constant, not a Param), so that layers of different
        # depth share one graphdef and a scanned stack of them holds [R, H] decays
        self.decay = make_constant(lightning_decay(num_heads, layer_idx, n_layers, decay_rule),
                                   (None,))
        self.impl, self.dtype = impl, dtype
        lin = lambda: Linear(d_model, d_model, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.u_proj = lin(), lin(), lin(), lin()
        self.norm = RMSNorm(d_model, dtype=dtype)
        self.o_proj = Linear(d_model, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.h, self.d, self.d), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """The state 4·H·D·D bytes (float32 whatever `dtype`), independent of context_len."""
        return 4 * self.h * self.d * self.d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len: 4·2·d·d (q, k, v, u) + 2·d·d (o)
        + 5·H·D·D (recurrent form: decay λS D·D, update k vᵀ 2·D·D, readout Sᵀq 2·D·D). The
        SiLUs, the norm and the sigmoid gate are O(d) and not counted."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.u_proj, self.o_proj)
        return float(sum(p.flops_per_token() for p in projs) + 5 * self.h * self.d * self.d)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        b, t, _ = x.shape
        shape = (b, t, self.h, self.d)
        q = jax.nn.silu(self.q_proj(x)).reshape(shape)
        k = jax.nn.silu(self.k_proj(x)).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        g = jnp.broadcast_to(jax.lax.stop_gradient(self.decay[...]), (b, t, self.h))
        o, state = sequence_or_step(simple_gla, simple_gla_step, q, k, v, g,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl, scale=1.0)
        new_cache = None if cache is None else {"state": state}
        o = self.norm(o.reshape(b, t, -1)) * jax.nn.sigmoid(self.u_proj(x))
        return self.o_proj(o), new_cache
