"""Attention on TPU through jax's splash attention (`jax.experimental.pallas.ops.tpu`).

Splash attention is a Pallas TPU flash kernel (forward, dq and dkv kernels) that skips blocks
its static mask marks empty. Here the static mask is causal, or local with the window
(`LocalMask` with (w − 1, 0): the window counts the token itself), for all heads; packed documents
are its `SegmentIds` (a key is visible only to queries with the same id). The kernel works on
one batch row [H, T, D] with grouped heads (Hq a multiple of Hkv), so it is vmapped over the
batch. `pallas_call` having no partitioning rule, `Op.run` calls this function once per (batch,
head) shard of the current mesh (`pallas_kernels/common/sharding.py`): it sees its own rows and
heads only, and a mesh that does not divide the shapes runs "blocked" instead.

Adaptations: q is pre-scaled (splash takes no scale); T is padded to a multiple of 128 (the
kernel's lane width) with segment id 0; the padded and padding (id 0) queries see only each other
under splash's rule, so their output is set to 0 afterwards — real queries never see them, so no
gradient leaks. Block sizes: the largest of 512, 256, 128 dividing the padded T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_axis

__all__ = ["attention_splash", "attention_splash_entry", "splash_block"]

_LANES = 128


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


def attention_splash(q, k, v, segment_ids=None, *, scale: float, window: int | None = None,
                     interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D*]; segment_ids [B, T] (0 = padding) or None
    -> o [B, T, Hq, Dv], causal (and windowed) within each document. Unsharded: one device's
    rows and heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t = q.shape[:2]
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q, k, v = (pad_axis(x, 1, _LANES).transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, h, Tp, D]
    seg_p = pad_axis(seg.astype(jnp.int32), 1, _LANES)  # [b, Tp]
    kernel = _kernel(q.shape[2], q.shape[1], window, interpret)
    o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q, k, v, seg_p)  # [b, h, Tp, Dv]
    o = o.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where((seg != 0)[:, :, None, None], o, jnp.zeros_like(o))


def attention_splash_entry(q, k, v, *, initial_state=None, segment_ids=None,
                           output_final_state=False, scale, window, interpret=False):
    """The op frame's contract for "mosaic_tpu" (see ops.py)."""
    return attention_splash(q, k, v, segment_ids, scale=scale, window=window,
                            interpret=interpret), None
