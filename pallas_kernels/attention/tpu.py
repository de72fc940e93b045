"""Attention on TPU through jax's splash attention (`jax.experimental.pallas.ops.tpu`).

Splash attention is a Pallas TPU flash kernel (forward, dq and dkv kernels) that skips blocks
its static mask marks empty. Here the static mask is causal, or local with the window
(`LocalMask` with (w − 1, 0): the window counts the token itself), for all heads; packed documents
are its `SegmentIds` (a key is visible only to queries with the same id). The kernel works on
one batch row [H, T, D] with grouped heads (Hq a multiple of Hkv), so it is vmapped over the
batch, and — `pallas_call` having no partitioning rule — called inside `shard_map` over the
batch axes ("data", "fsdp") and the head axis ("tensor") of the current mesh: each shard runs the
kernel on its own rows and heads (a mesh axis that does not divide the size is left replicated).

Adaptations: q is pre-scaled (splash takes no scale); T is padded to a multiple of 128 (the
kernel's lane width) with segment id 0; the padded and padding (id 0) queries see only each other
under splash's rule, so their output is set to 0 afterwards — real queries never see them, so no
gradient leaks. Block sizes: the largest of 512, 256, 128 dividing the padded T.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import pad_axis

__all__ = ["attention_splash", "attention_splash_entry", "splash_block"]

_LANES = 128
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def splash_block(t: int) -> int:
    """Block size of the (padded) length t: the largest of 512, 256, 128 dividing it."""
    return next(b for b in (512, 256, 128) if t % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(t: int, heads: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (t, t)
    mask = (sa.CausalMask(shape) if window is None
            else sa.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    blk = splash_block(t)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _per_shard(q, k, v, seg, *, scale, window, interpret):
    """One shard: q [b, T, h, D], k/v [b, T, hkv, D*], seg [b, T] -> o [b, T, h, Dv]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    t = q.shape[1]
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q, k, v = (pad_axis(x, 1, _LANES).transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, h, Tp, D]
    seg_p = pad_axis(seg.astype(jnp.int32), 1, _LANES)  # [b, Tp]
    kernel = _kernel(q.shape[2], q.shape[1], window, interpret)
    o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q, k, v, seg_p)  # [b, h, Tp, Dv]
    o = o.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where((seg != 0)[:, :, None, None], o, jnp.zeros_like(o))


def _specs(mesh, b: int, hq: int, hkv: int):
    """PartitionSpecs (for [B, T, H, D] and [B, T]) over the mesh axes that divide the sizes."""
    batch = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if batch and b % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    head = None
    if _HEAD_AXIS in mesh.axis_names and mesh.shape[_HEAD_AXIS] > 1:
        n = mesh.shape[_HEAD_AXIS]
        head = _HEAD_AXIS if hq % n == 0 and hkv % n == 0 else None
    batch_spec = batch or None
    return P(batch_spec, None, head, None), P(batch_spec, None)


def attention_splash(q, k, v, segment_ids=None, *, scale: float, window: int | None = None,
                     interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D*]; segment_ids [B, T] (0 = padding) or None
    -> o [B, T, Hq, Dv], causal (and windowed) within each document."""
    b, t, hq, _ = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    fn = functools.partial(_per_shard, scale=float(scale), window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    x_spec, seg_spec = _specs(mesh, b, hq, k.shape[2])
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                         out_specs=x_spec, check_vma=False)(q, k, v, segment_ids)


def attention_splash_entry(q, k, v, *, initial_state=None, segment_ids=None,
                           output_final_state=False, scale, window, interpret=False):
    """The op frame's contract for "mosaic_tpu" (see ops.py)."""
    return attention_splash(q, k, v, segment_ids, scale=scale, window=window,
                            interpret=interpret), None
