"""Public causal softmax attention: checks, masks, and the one place `impl` is resolved.

    attention(q, k, v, *, scale=None, segment_ids=None, kv_segment_ids=None, q_positions=None,
              kv_positions=None, window=None, kv_sinks=0, impl="auto") -> o

Without positions, query i and key i are both at position i (training / prefill from scratch,
Tq == Tk). With a cache, the layer passes absolute positions: queries align to the end of each
row's valid keys, rows may have different lengths, and a ring buffer may hold keys in any slot
order (kv_positions = −1 marks an empty slot). See `reference.py` for the math.

Implementations:
  * "reference" (float32, dense) and "xla" (`jax.nn.dot_product_attention`, dense) take the
    [B, Tq, Tk] visibility mask, built here for them only: O(T²) memory.
  * "blocked" (`blocked.py`): flash-style plain JAX with its own backward, O(T·block) memory;
    every form (packing, window, sinks, caches). "auto" gives it on CPU, for float32, and for
    every form the kernels below do not take.
  * "mosaic_tpu" (`tpu.py`): jax's splash attention, per (batch, head) shard (`Op.run`; a mesh
    that does not divide the shapes runs "blocked"). "auto" on TPU for bf16/fp16
    self-attention (no positions, no sinks).
  * "cudnn" (`gpu.py`): jax's cuDNN fused attention with packed q/kv offsets, bf16/fp16 on
    Hopper+. "auto" on such a GPU for bf16/fp16 self-attention within cuDNN's head-dim limits.
The cached / sink forms (positions, kv_sinks or separate kv_segment_ids) given to "mosaic_tpu"
or "cudnn" run through "blocked": neither kernel takes per-token positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.blocked import attention_blocked
from pallas_kernels.attention.gpu import cudnn_supported
from pallas_kernels.attention.reference import attention_mask, attention_reference
from pallas_kernels.attention.xla import attention_xla
from pallas_kernels.common import check_float, check_segment_ids, check_shape
from pallas_kernels.common.frame import BenchSpec, Op

__all__ = ["OP", "attention", "attention_mask"]

_HALF = (jnp.bfloat16, jnp.float16)


# The op frame's contract: fn(q, k, v, *, initial_state, segment_ids, output_final_state,
# **static) -> (o, None); attention has no recurrent state. The dense impls take the mask built
# in `attention`; the others take positions and segment ids and build theirs per block.
def _reference(q, k, v, *, initial_state=None, segment_ids=None, output_final_state=False,
               mask, scale, plain_causal, window):
    return attention_reference(q, k, v, mask, scale), None


def _xla(q, k, v, *, initial_state=None, segment_ids=None, output_final_state=False,
         mask, scale, plain_causal, window):
    return attention_xla(q, k, v, mask, scale, plain_causal=plain_causal, window=window), None


def _blocked(q, k, v, *, initial_state=None, segment_ids=None, output_final_state=False,
             q_positions=None, kv_positions=None, kv_segment_ids=None, scale, window,
             kv_sinks=0):
    """Also what a fused kernel's call becomes where the mesh does not divide its shapes
    (`Op.run`): then only the self-attention arguments come (segment_ids may be None)."""
    b, tq = q.shape[:2]
    if q_positions is None:  # self-attention: query i and key i at position i
        q_positions = kv_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    if segment_ids is None:
        segment_ids = jnp.ones((b, tq), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    return attention_blocked(q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids,
                             scale=scale, window=window, kv_sinks=kv_sinks), None


def _bench_inputs(key, B, T, H, D):
    """q, k, v [B, T, H, D] standard normal (no grouping, no window)."""
    ks = jax.random.split(key, 3)
    return tuple(jax.random.normal(kk, (B, T, H, D)) for kk in ks)


OP = Op("attention",
        impls={"reference": "pallas_kernels.attention.ops:_reference",
               "xla": "pallas_kernels.attention.ops:_xla",
               "blocked": "pallas_kernels.attention.ops:_blocked",
               "cudnn": "pallas_kernels.attention.gpu:attention_cudnn_entry",
               "mosaic_tpu": "pallas_kernels.attention.tpu:attention_splash_entry"},
        fallback="blocked",
        bench=BenchSpec(inputs=_bench_inputs, lengths=(1024, 4096),
                        impls=("blocked", "xla", "reference")))
_OP = OP.name


def _choose(impl: str, q, k, v, self_attention: bool) -> str:
    """The implementation that runs. `OP.resolve` maps "auto" to the backend's kernel
    ("mosaic_tpu" on TPU) or "blocked"; here "auto" keeps the TPU kernel for bf16/fp16
    self-attention only and takes cuDNN on a Hopper+ GPU for the same, and the cached / sink
    forms of an explicit kernel run through "blocked" (module docstring)."""
    name = OP.resolve(impl)
    half = q.dtype in _HALF
    if impl == "auto":
        if name == "mosaic_tpu" and not (half and self_attention):
            return "blocked"
        if (name == "blocked" and half and self_attention and jax.default_backend() == "gpu"
                and cudnn_supported(q, k, v)):
            return "cudnn"
        return name
    if name in ("mosaic_tpu", "cudnn") and not self_attention:
        return "blocked"
    return name


@OP.entry
def attention(q, k, v, *, scale=None, segment_ids=None, kv_segment_ids=None, q_positions=None,
              kv_positions=None, window: int | None = None, kv_sinks: int = 0, impl: str = "auto"):
    """Causal grouped-query softmax attention. q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv].

    `kv_sinks`: the first kv_sinks keys (e.g. learned persistent tokens) are visible to every real
    query, whatever their position, window or segment; the caller passes kv_positions and
    kv_segment_ids for all Tk keys, sinks included."""
    check_float(_OP, q=q, k=k, v=v)
    if q.ndim != 4:
        raise ValueError(f"{_OP}: q must have shape [B, T, H, D], got {list(q.shape)}")
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    check_shape(_OP, "k", k, (b, tk, hkv, d))
    check_shape(_OP, "v", v, (b, tk, hkv, None))
    if hq % hkv:
        raise ValueError(f"{_OP}: q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if window is not None and window < 1:
        raise ValueError(f"{_OP}: window must be a positive int or None, got {window}")
    if not isinstance(kv_sinks, int) or kv_sinks < 0:
        raise ValueError(f"{_OP}: kv_sinks must be a non-negative int, got {kv_sinks!r}")
    scale = d ** -0.5 if scale is None else scale
    OP.resolve(impl)

    # Self-attention of packed documents: what the fused kernels take.
    self_attention = (q_positions is None and kv_positions is None and not kv_sinks
                      and kv_segment_ids is None)
    plain = self_attention and segment_ids is None
    if q_positions is None:
        if tq != tk:
            raise ValueError(f"{_OP}: q_positions/kv_positions are required when Tq ({tq}) != Tk ({tk})")
        q_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
    check_shape(_OP, "q_positions", q_positions, (b, tq))
    check_shape(_OP, "kv_positions", kv_positions, (b, tk))
    if segment_ids is None:
        segment_ids = jnp.ones((b, tq), jnp.int32)
    check_segment_ids(_OP, segment_ids, b, tq)
    if kv_segment_ids is None:
        if tq != tk:
            raise ValueError(f"{_OP}: kv_segment_ids is required when Tq ({tq}) != Tk ({tk})")
        kv_segment_ids = segment_ids
    check_segment_ids(_OP, kv_segment_ids, b, tk)

    name = _choose(impl, q, k, v, self_attention)
    if name in ("reference", "xla"):
        mask = attention_mask(q_positions, kv_positions, segment_ids, kv_segment_ids, window,
                              kv_sinks)
        o, _ = OP.run(name, (q, k, v), mask=mask, scale=scale, plain_causal=plain, window=window)
    elif name == "blocked":
        o, _ = OP.run(name, (q, k, v), segment_ids=segment_ids, q_positions=q_positions,
                      kv_positions=kv_positions, kv_segment_ids=kv_segment_ids, scale=scale,
                      window=window, kv_sinks=kv_sinks)
    else:  # the fused kernels: splash runs per (batch, head) shard, cuDNN partitions itself
        o, _ = OP.run(name, (q, k, v), segment_ids=None if plain else segment_ids, scale=scale,
                      window=window)
    return o
