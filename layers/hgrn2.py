"""HGRN-2 mixer (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion"), fla's
parametrisation with the forget-gate lower bound kept per layer.

    f = lb + (1 − lb)·sigmoid(x W_f)          # [B, T, n, E] forget gate in (lb, 1)
    g = log f,  k = 1 − f                     # the input gate is tied to the forget gate
    q = SiLU(x W_q),  v = x W_i               # q [B, T, n, E], v [B, T, n, E]
    S_t = Diag(f_t) S_{t−1} + k_t v_tᵀ,  o_t = E^−1/2 S_tᵀ q_t       (gla, K = V = E)
    y = RMSNorm(o) W_o                        # one RMSNorm over all n·E = d features

State expansion: each head's key and value width is E = `expand_ratio` (fla: 128), so there are
n = d / E heads whatever the model's `num_heads` (as fla, which ignores num_heads when
expand_ratio is set); `expand_ratio=None` uses the model's heads, E = d / num_heads. The scale
E^−1/2 is fla's: its HGRN-2 layer passes no scale to the GLA kernel, whose default is K^−1/2.

Lower bound (a departure from fla's form, same values at initialisation): fla computes the
bounds of all L layers at the model level from one [L, d] parameter P as
lb_l = cumsum(softmax_L(P))_l − softmax_L(P)_0, so layer 0's bound is exactly 0 and, at P = 0,
lb_l = l / L, increasing with depth. A layer here cannot see the others' parameters, so each
layer l > 0 holds its own bound lb = sigmoid(β) per forget channel, β a no_decay parameter
initialised to logit(l / L) (`layer_idx` = l and `n_layers` = L come from the registry);
layer 0 has no bound parameter and its bound is 0 (f = sigmoid(x W_f)). The bounds start equal
to fla's but are trained independently (not kept monotone across layers).

g and k are computed in log space for accuracy where f → 1:
g = logaddexp(log lb, log(1 − lb) + logsigmoid(z)), k = (1 − lb)·sigmoid(−z). The cache is the
state [B, n, E, E] (float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import Linear, RMSNorm, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.gla import gla, gla_step

__all__ = ["HGRN2", "initial_lower_bound"]


def initial_lower_bound(layer_idx: int, n_layers: int) -> float:
    """fla's lower bound of layer l of L at initialisation: l / L (layer 0: 0)."""
    if not 0 <= layer_idx < n_layers:
        raise ValueError(f"HGRN2: layer_idx must be in [0, n_layers={n_layers}), got {layer_idx}")
    return layer_idx / n_layers


class HGRN2(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, layer_idx: int, n_layers: int,
                 expand_ratio: int | None = 128, norm_eps: float = 1e-5, impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        e = expand_ratio if expand_ratio is not None else d_model // num_heads
        if e < 1 or d_model % e:
            raise ValueError(f"HGRN2: expand_ratio (head width, {e}) must divide d_model "
                             f"({d_model}); allowed: a divisor of d_model, or None for "
                             f"d_model / num_heads")
        self.h, self.e = d_model // e, e
        self.impl, self.dtype = impl, dtype
        lin = lambda: Linear(d_model, d_model, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.f_proj, self.i_proj = lin(), lin(), lin()
        lb0 = initial_lower_bound(layer_idx, n_layers)
        # Layer 0's bound is exactly 0: no parameter (fla). Others: lb = sigmoid(β), β = logit.
        self.lb_logit = None if layer_idx == 0 else make_param(
            None, jnp.full((d_model,), math.log(lb0 / (1.0 - lb0)), jnp.float32), (d_model,),
            ("heads",), no_decay=True)
        self.o_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(d_model, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def lower_bound(self):
        """The forget gate's lower bound per channel [d] float32 (zeros for layer 0)."""
        if self.lb_logit is None:
            return jnp.zeros((self.h * self.e,), jnp.float32)
        return jax.nn.sigmoid(self.lb_logit[...])

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.h, self.e, self.e), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """The state 4·n·E·E bytes (float32 whatever `dtype`), independent of context_len."""
        return 4 * self.h * self.e * self.e

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len: 3·2·d·d (q, f, i) + 2·d·d (o)
        + 5·n·E·E (recurrent form: decay Diag(f)S E·E, update k vᵀ 2·E·E, readout Sᵀq 2·E·E).
        The gates, the SiLU and the norm are O(d) and not counted."""
        projs = (self.q_proj, self.f_proj, self.i_proj, self.o_proj)
        return float(sum(p.flops_per_token() for p in projs) + 5 * self.h * self.e * self.e)

    def gates(self, x):
        """(g = log f, k = 1 − f), each [B, T, n, E] float32."""
        b, t, _ = x.shape
        z = self.f_proj(x).astype(jnp.float32)  # [B, T, d]
        if self.lb_logit is None:
            g, k = jax.nn.log_sigmoid(z), jax.nn.sigmoid(-z)
        else:
            beta = self.lb_logit[...]
            # log lb = logsigmoid(β), log(1 − lb) = logsigmoid(−β)
            g = jnp.logaddexp(jax.nn.log_sigmoid(beta), jax.nn.log_sigmoid(-beta)
                              + jax.nn.log_sigmoid(z))
            k = jax.nn.sigmoid(-beta) * jax.nn.sigmoid(-z)
        shape = (b, t, self.h, self.e)
        return g.reshape(shape), k.reshape(shape)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        shape = (b, t, self.h, self.e)
        q = jax.nn.silu(self.q_proj(x)).reshape(shape)
        v = self.i_proj(x).reshape(shape)
        g, k = self.gates(x)
        o, state = sequence_or_step(gla, gla_step, q, k.astype(v.dtype), v, g,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl)  # [B, T, n, E]
        y = self.o_proj(self.o_norm(o.reshape(b, t, -1)))
        return y, None if cache is None else {"state": state}
