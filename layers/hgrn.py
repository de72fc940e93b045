"""HGRN mixer (Qin et al., "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling"), in fla's HGRNAttention parametrisation:

    i = x W_i,  z = x W_f,  u = x W_g                                # [B, T, E], E = d·expand_ratio
    f = β + (1 − β) ⊙ sigmoid(z)                                     # forget gate, lower bound β
    h_t = f_t ⊙ h_{t−1} + SiLU(i_t) ⊙ (1 − f_t)                      # hgrn(x, g = log f)
    y = (RMSNorm(h) ⊙ SiLU(u)) W_o                                   # gated RMSNorm, swish gate

The lower bound β ([E], one per channel) grows with depth, so deeper layers keep longer memories.
fla computes all layers' bounds at model level (a [L, E] parameter, softmax over layers, cumsum,
minus the first), which at its zero initialisation gives layer l the bound l/L. Here each layer
holds its own parameter: β = sigmoid(θ) with θ initialised to logit(l/L), the same bounds at
initialisation, kept in (0, 1) during training; layer 0 has no bound (β = 0, f = sigmoid(z)), as
in fla. The registry passes ``layer_idx`` and ``n_layers`` (``fixed=lambda cfg, layer_idx:
dict(layer_idx=layer_idx, n_layers=cfg.n_layers)``). θ is excluded from weight decay.

The gates are computed in log space so that neither f nor 1 − f underflows:
log f = logaddexp(log β, log(1 − β) + log sigmoid(z)) and 1 − f = (1 − β) sigmoid(−z).

``num_heads`` is accepted because the registry passes it to every mixer, and ignored: HGRN's
recurrence is elementwise (in effect one head per channel, each with a scalar state) and fla's
output norm spans the whole width E, so there is nothing for heads to group. fla's optional short
convolution (off by default there) is not provided. The cache is the state [B, E] float32, one
vector per layer; decoding (T = 1) uses the op's single-step form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import GatedRMSNorm, Linear, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.hgrn import hgrn, hgrn_step

__all__ = ["HGRN", "initial_lower_bound"]


def initial_lower_bound(layer_idx: int, n_layers: int) -> float:
    """Layer ``layer_idx``'s forget-gate lower bound at initialisation: l / L (0 for layer 0),
    what fla's softmax-cumsum over a zero-initialised [L, E] parameter gives."""
    return layer_idx / n_layers


class HGRN(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, layer_idx: int, n_layers: int,
                 expand_ratio: int = 1, norm_eps: float = 1e-5, impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if not 0 <= layer_idx < n_layers:
            raise ValueError(f"HGRN: layer_idx must be in [0, n_layers) = [0, {n_layers}), "
                             f"got {layer_idx}")
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ValueError(f"HGRN: expand_ratio must be a positive int, got {expand_ratio!r}")
        width = d_model * expand_ratio
        self.width, self.impl, self.dtype = width, impl, dtype
        lin = lambda: Linear(d_model, width, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.i_proj, self.f_proj, self.g_proj = lin(), lin(), lin()
        bound = initial_lower_bound(layer_idx, n_layers)
        # [E] logit of the lower bound; layer 0 has none (β = 0).
        self.lower_bound_logit = None if layer_idx == 0 else make_param(
            None, jnp.full((width,), math.log(bound / (1.0 - bound)), jnp.float32), (width,),
            ("heads",), no_decay=True)
        self.o_norm = GatedRMSNorm(width, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(width, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def lower_bound(self) -> jax.Array:
        """β [E] in [0, 1): the forget gate's lower bound (zeros for layer 0)."""
        if self.lower_bound_logit is None:
            return jnp.zeros((self.width,), jnp.float32)
        return jax.nn.sigmoid(self.lower_bound_logit[...])

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.width), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """The state 4·E bytes (float32 whatever `dtype`), independent of context_len."""
        return 4 * self.width

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len: 3·2·d·E (i, f, g) + 2·E·d (o)
        + 2·E (the recurrence's multiply-add f ⊙ h + x). The gates, SiLUs and the output norm
        are O(E) elementwise and not counted."""
        projs = (self.i_proj, self.f_proj, self.g_proj, self.o_proj)
        return float(sum(p.flops_per_token() for p in projs) + 2 * self.width)

    def gates(self, x):
        """x [B, T, d] -> (input SiLU(i) ⊙ (1 − f) in ``dtype``, log f float32), both [B, T, E]."""
        z = self.f_proj(x).astype(jnp.float32)
        if self.lower_bound_logit is None:
            log_f, one_minus_f = jax.nn.log_sigmoid(z), jax.nn.sigmoid(-z)
        else:
            theta = self.lower_bound_logit[...]                               # [E]
            log_f = jnp.logaddexp(jax.nn.log_sigmoid(theta),
                                  jax.nn.log_sigmoid(-theta) + jax.nn.log_sigmoid(z))
            one_minus_f = jax.nn.sigmoid(-theta) * jax.nn.sigmoid(-z)
        inp = jax.nn.silu(self.i_proj(x).astype(jnp.float32)) * one_minus_f
        return inp.astype(self.dtype), log_f

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        inp, log_f = self.gates(x)                                            # [B, T, E] each
        h, state = sequence_or_step(hgrn, hgrn_step, inp, log_f,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl)
        y = self.o_proj(self.o_norm(h, self.g_proj(x)))
        return y, (None if cache is None else {"state": state})
