"""Building blocks shared by every mixer: parameters with sharding metadata, projections,
RMSNorm, gated RMSNorm, the SwiGLU MLP, rotary embedding, the causal short convolution (one per
stream: `StreamConvs`), and the cost helpers every mixer's `flops_per_token` / `cache_bytes` use.

The layer contract (layers/common.py) that every mixer, and every new one, follows:

1. Projections are never sliced apart along a dimension that can be sharded. Each stream (q, k,
   v, a gate, Mamba's x / B / C / dt ...) has its own `Linear` and, where it has a short
   convolution, its own `CausalConv1d` (`StreamConvs`); a projection's output is reshaped into
   whole heads, never cut at a feature offset or concatenated with another stream's. Under tensor
   parallelism a projection's output columns are split over devices; slicing a fused
   [q | k | v] at offsets would cut across that split (a reshard per slice, or wrong widths when
   the tensor axis does not divide the parts). A split that keeps heads whole (a [d, 3, H]
   weight, heads last) is allowed. `tests/test_mixers.py::test_projections_are_not_split`
   checks every registered mixer's forward pass for it.
2. Every mixer reports its cost: `flops_per_token(seq_len)` (forward FLOPs of what its math
   needs, convention below) and `cache_bytes(context_len, dtype)` (one row of its decode cache,
   exactly what `init_cache` allocates; `tests/test_layer_costs.py` checks both for every
   registered mixer).

Cost convention: forward FLOPs per token of what the math needs, a multiply-add counted as 2; a
projection d_in -> d_out is 2·d_in·d_out. Biases, norms, activations, rotary and softmax
exponentials are O(d) per token and not counted.

Parameters are float32 and carry two pieces of metadata that the trainer reads:
``logical_axes`` (logical axis names, mapped to mesh axes by the rule table in
``train/sharding.py``) and ``no_decay`` (True for norms, biases, gates and decay parameters, which
AdamW's weight decay skips). Modules compute in ``dtype`` (float32 or bfloat16).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.partitioning import constrain

__all__ = [
    "make_param",
    "Constant",
    "make_constant",
    "Linear",
    "RMSNorm",
    "GatedRMSNorm",
    "SwiGLU",
    "rotary_embedding",
    "positions_from_segments",
    "CausalConv1d",
    "StreamConvs",
    "valid_lengths",
    "itemsize",
    "mean_causal_keys",
]

Initializer = Callable[..., jax.Array]


def make_param(rngs: nnx.Rngs | None, init: Initializer | jax.Array, shape: Sequence[int],
               axes: Sequence[str | None], *, no_decay: bool = False) -> nnx.Param:
    """A float32 parameter tagged with logical axes and the weight-decay flag."""
    if len(axes) != len(shape):
        raise ValueError(f"make_param: axes {tuple(axes)} do not match shape {tuple(shape)}")
    value = init if isinstance(init, jax.Array) else init(rngs.params(), tuple(shape), jnp.float32)
    # `logical_axes` (not flax's own sharding metadata): sharding is applied by the rule table in
    # train/sharding.py, never by flax at construction time.
    return nnx.Param(value, logical_axes=tuple(axes), no_decay=no_decay)


class Constant(nnx.Variable):
    """A fixed array of the architecture stored as state, not a parameter (never trained).

    Per-layer constants (e.g. Lightning's decay from its depth) live here rather than as static
    Python attributes so that all repeats of a layer group share one graphdef and their constants
    can be stacked and scanned over (zoo/model.py). The optimizer leaves them alone
    (`train.sharding.trainable_mask`); layers read them through `jax.lax.stop_gradient`, so their
    gradient is exactly zero as well."""


def make_constant(value, axes: Sequence[str | None]) -> Constant:
    """A float32 constant tagged like a parameter (logical axes, excluded from weight decay)."""
    value = jnp.asarray(value, jnp.float32)
    if len(axes) != value.ndim:
        raise ValueError(f"make_constant: axes {tuple(axes)} do not match shape {value.shape}")
    return Constant(value, logical_axes=tuple(axes), no_decay=True)


class Linear(nnx.Module):
    """y = x W (+ b). W: [d_in, d_out] with logical axes ``axes``."""

    def __init__(self, d_in: int, d_out: int, *, axes=("embed", "mlp"), use_bias: bool = False,
                 init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")
        self.w = make_param(rngs, init, (d_in, d_out), axes)
        self.b = (make_param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], no_decay=True)
                  if use_bias else None)
        self.dtype = dtype

    def flops_per_token(self) -> int:
        """2·d_in·d_out (the bias add is O(d_out), not counted)."""
        d_in, d_out = self.w.shape
        return 2 * d_in * d_out

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.w[...].astype(self.dtype))
        if self.b is not None:
            y = y + self.b[...].astype(self.dtype)
        return y


def _rms_normalize(x, eps):
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · γ, computed in float32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "norm",
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = make_param(None, jnp.ones((dim,), jnp.float32), (dim,), (axis_name,),
                                no_decay=True)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        return (_rms_normalize(x, self.eps) * self.scale[...]).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """Gated RMSNorm over groups of ``group_size`` features.

    norm_before_gate=True (GatedDeltaNet): y = RMSNorm(x) · silu(z);
    norm_before_gate=False (Mamba-2):     y = RMSNorm(x · silu(z)).
    """

    def __init__(self, dim: int, *, group_size: int | None = None, eps: float = 1e-6,
                 norm_before_gate: bool = True, axis_name: str | None = "norm",
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = make_param(None, jnp.ones((dim,), jnp.float32), (dim,), (axis_name,),
                                no_decay=True)
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not a multiple of group_size {group_size}")
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.dtype = dtype

    def __call__(self, x, z):
        gate = jax.nn.silu(z.astype(jnp.float32))
        xf = x.astype(jnp.float32)
        if not self.norm_before_gate:
            xf = xf * gate
        shape = xf.shape
        xg = xf.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        y = _rms_normalize(xg, self.eps).reshape(shape)
        if self.norm_before_gate:
            y = y * gate
        return (y * self.scale[...]).astype(self.dtype)


class SwiGLU(nnx.Module):
    """MLP(x) = (silu(x W_gate) ⊙ x W_up) W_down."""

    def __init__(self, d_model: int, d_hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate = Linear(d_model, d_hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = Linear(d_model, d_hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = Linear(d_hidden, d_model, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def flops_per_token(self) -> int:
        """3·2·d_model·d_hidden (gate, up, down; the SiLU and the product are O(d_hidden))."""
        return sum(p.flops_per_token() for p in (self.gate, self.up, self.down))

    def __call__(self, x):
        h = jax.nn.silu(self.gate(x)) * self.up(x)                            # [B, T, d_hidden]
        # the hidden layer split over the tensor axis like gate/up's output columns
        h = constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",)) if h.ndim >= 2 else h
        return self.down(h)


def rotary_embedding(x, positions, *, theta: float = 10000.0, fraction: float = 1.0):
    """Rotate feature pairs (i, i + d/2) of x [B, T, H, D] by angle pos · θ^(−2i/d).

    positions: [B, T] int (per-document positions when documents are packed). Only the first
    ``fraction`` of the features rotate (partial rotary); the rest pass through.
    """
    d = x.shape[-1]
    rot = int(d * fraction) // 2 * 2
    if rot == 0:
        return x
    half = rot // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot)  # [half]
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rot], xf[..., rot:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def positions_from_segments(segment_ids):
    """Position of each token within its document: [B, T] int32, counted from each start."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    prev = jnp.concatenate([jnp.full((b, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def itemsize(dtype) -> int:
    """Bytes per element of ``dtype``."""
    return jnp.dtype(dtype).itemsize


def mean_causal_keys(seq_len: int, window: int | None = None) -> float:
    """Keys a causal query sees, averaged over the T queries of a sequence:
    (1/T) Σ_{t=1..T} min(t, w) = (T + 1)/2 when w ≥ T (or no window), else w − w(w − 1)/(2T)."""
    t = seq_len
    if window is None or window >= t:
        return (t + 1) / 2
    return window - window * (window - 1) / (2 * t)


def valid_lengths(segment_ids, batch: int, length: int):
    """Number of non-padding tokens per row: [B] int32 (all T when segment_ids is None)."""
    if segment_ids is None:
        return jnp.full((batch,), length, jnp.int32)
    return jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution y_t = Σ_{j<K} w_j ⊙ x_{t−j} (+ b), then an optional SiLU.

    With ``segment_ids`` a token only sees earlier tokens of its own document, and padding
    inputs are zeroed. The cache holds the last K−1 real inputs of each row, [B, K−1, C], so
    prefill of rows with different lengths followed by decoding equals the full pass.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: bool = True,
                 use_bias: bool = False, axis_name: str | None = "conv", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        bound = 1.0 / kernel_size ** 0.5
        init = nnx.initializers.uniform(2 * bound)
        w = init(rngs.params(), (kernel_size, channels), jnp.float32) - bound
        self.w = make_param(None, w, (kernel_size, channels), (None, axis_name))
        self.b = (make_param(None, jnp.zeros((channels,), jnp.float32), (channels,), (axis_name,),
                             no_decay=True) if use_bias else None)
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype

    def init_cache(self, batch: int, dtype=jnp.float32):
        return jnp.zeros((batch, self.kernel_size - 1, self.w.shape[1]), dtype)

    def flops_per_token(self) -> int:
        """2·C·K (K taps per channel; bias and SiLU are O(C))."""
        return 2 * self.w.shape[1] * self.kernel_size

    def cache_bytes(self, dtype=jnp.bfloat16) -> int:
        """(K − 1)·C·itemsize(dtype): the last K − 1 inputs of one row, as `init_cache` holds them."""
        return (self.kernel_size - 1) * self.w.shape[1] * itemsize(dtype)

    def __call__(self, x, *, segment_ids=None, cache=None):
        """x: [B, T, C] -> (y [B, T, C], new cache [B, K−1, C] or None)."""
        b, t, c = x.shape
        k = self.kernel_size
        x = x.astype(self.dtype)
        if segment_ids is not None:
            x = jnp.where((segment_ids != 0)[..., None], x, 0)
        past = cache.astype(self.dtype) if cache is not None else jnp.zeros((b, k - 1, c), x.dtype)
        full = jnp.concatenate([past, x], axis=1)  # [B, K-1+T, C]
        w = self.w[...].astype(self.dtype)
        if segment_ids is not None:
            # Document of each position in `full`; cached inputs belong to the first token's doc.
            seg_full = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k - 1, axis=1), segment_ids],
                                       axis=1) if cache is not None else jnp.concatenate(
                [jnp.full((b, k - 1), -1, segment_ids.dtype), segment_ids], axis=1)
        y = jnp.zeros((b, t, c), jnp.float32)
        for j in range(k):  # tap j reads x_{t-j}
            xs = jax.lax.dynamic_slice_in_dim(full, k - 1 - j, t, axis=1)
            if segment_ids is not None:
                same = jax.lax.dynamic_slice_in_dim(seg_full, k - 1 - j, t, axis=1) == segment_ids
                xs = jnp.where(same[..., None], xs, 0)
            y = y + xs.astype(jnp.float32) * w[k - 1 - j].astype(jnp.float32)
        if self.b is not None:
            y = y + self.b[...]
        if self.activation:
            y = jax.nn.silu(y)
        y = y.astype(self.dtype)
        new_cache = None
        if cache is not None:
            n = valid_lengths(segment_ids, b, t)  # [B]
            idx = n[:, None] + jnp.arange(k - 1)[None, :]  # last K-1 real inputs in `full`
            new_cache = jnp.take_along_axis(full, idx[:, :, None], axis=1).astype(cache.dtype)
        return y, new_cache


class StreamConvs(nnx.Module):
    """One `CausalConv1d` per stream, so that streams are never concatenated and sliced apart
    (the layer contract, module docstring): y_s = conv_s(x_s) for each stream s.

    ``channels`` {stream name: width}; the convs are attributes of those names (parameters
    ``<name>.w``), made in that order. The cache is {name: [B, K − 1, C_s]}.
    A stream's channels are whole heads (h·D + d), so its conv is split over the tensor axis
    like the projection feeding it (logical axis "heads"); ``shared`` names streams that every
    head reads (Mamba's B and C), whose convs stay whole.
    """

    def __init__(self, channels: dict[str, int], kernel_size: int = 4, *,
                 activation: bool = True, use_bias: bool = False, shared: tuple[str, ...] = (),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.names = tuple(channels)
        for name, width in channels.items():
            setattr(self, name, CausalConv1d(width, kernel_size, activation=activation,
                                             use_bias=use_bias,
                                             axis_name=None if name in shared else "heads",
                                             dtype=dtype, rngs=rngs))

    def _convs(self):
        return [(name, getattr(self, name)) for name in self.names]

    def init_cache(self, batch: int, dtype=jnp.float32) -> dict:
        return {name: conv.init_cache(batch, dtype) for name, conv in self._convs()}

    def flops_per_token(self) -> int:
        """2·K·Σ_s C_s (`CausalConv1d.flops_per_token` per stream)."""
        return sum(conv.flops_per_token() for _, conv in self._convs())

    def cache_bytes(self, dtype=jnp.bfloat16) -> int:
        """(K − 1)·Σ_s C_s·itemsize(dtype), as `init_cache` holds it."""
        return sum(conv.cache_bytes(dtype) for _, conv in self._convs())

    def __call__(self, streams: dict, *, segment_ids=None, cache=None):
        """{name: [B, T, C_s]} -> ({name: [B, T, C_s]}, new cache or None)."""
        out, new_cache = {}, {}
        for name, conv in self._convs():
            out[name], new_cache[name] = conv(streams[name], segment_ids=segment_ids,
                                              cache=None if cache is None else cache[name])
        return out, (new_cache if cache is not None else None)
