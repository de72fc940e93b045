"""Attention through jax's cuDNN fused (flash) attention, with packed documents as q/kv offsets.

The public `jax.nn.dot_product_attention(implementation="cudnn")` takes one valid length per row
only. Packing several documents into a row needs the private entry
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(q, k, v, bias, mask, q_seqlen,
kv_seqlen, q_offsets, kv_offsets, *, scale, mask_type, sliding_window_length, ...)` (present,
with this signature, in jax 0.10.2 and 0.11.2): a row's documents are given as their start
offsets [B, M+1] and lengths [B, M] (−1 fills unused entries), and cuDNN runs each document as
its own causal sequence — the same-document causal mask of `reference.py`. jax requires Hopper
(sm_90) or newer for this packed layout, bf16/fp16 inputs, head dim ≤ 256 and a multiple of 8
(Dv ≠ D needs cuDNN ≥ 9.10), and cannot trace it without a CUDA backend.

M, the most documents a row may hold, is static: `max_segments=None` takes T (always enough,
since a document has at least one token). Trailing padding (segment 0) belongs to no document:
its queries output 0, and q/k/v are zeroed there before the call so that whatever cuDNN leaves
in those rows (output or gradient) never reaches the result (`jnp.where` drops the cotangent).
"""

from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp

__all__ = ["attention_cudnn", "attention_cudnn_entry", "cudnn_supported", "cudnn_entry",
           "segment_offsets"]

_MODULE = "jax._src.cudnn.fused_attention_stablehlo"
_HALF = (jnp.bfloat16, jnp.float16)


def cudnn_entry():
    """jax's private packed cuDNN attention module, or None where it (or its q/kv offsets
    arguments) is missing in this jax version."""
    try:
        mod = importlib.import_module(_MODULE)
    except ImportError:
        return None
    fn = getattr(mod, "dot_product_attention", None)
    if fn is None or getattr(mod, "MaskType", None) is None:
        return None
    params = inspect.signature(fn).parameters
    needed = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "sliding_window_length")
    return mod if all(p in params for p in needed) else None


def _gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the first CUDA device, None without one."""
    if jax.default_backend() != "gpu":
        return None
    dev = jax.devices()[0]
    cap = getattr(dev, "compute_capability", None)
    if cap is None:
        return None
    major, minor = (int(x) for x in str(cap).split(".")[:2])
    return major, minor


def cudnn_supported(q, k, v) -> bool:
    """Whether "auto" may take cuDNN for these shapes: a Hopper+ GPU, the packed entry present,
    bf16/fp16, Tq == Tk, D == Dv ≤ 256 with D % 8 == 0."""
    cap = _gpu_capability()
    if cap is None or cap < (9, 0) or cudnn_entry() is None:
        return False
    d, dv = q.shape[-1], v.shape[-1]
    return (q.dtype in _HALF and q.dtype == k.dtype == v.dtype and q.shape[1] == k.shape[1]
            and d == dv and d <= 256 and d % 8 == 0)


def segment_offsets(segment_ids, max_segments: int):
    """segment_ids [B, T] (non-decreasing, 0 = trailing padding) -> (offsets [B, M+1],
    lengths [B, M]) int32 with M = max_segments: each document's first index and its length,
    −1 in unused entries (cuDNN's packed layout)."""
    b, t = segment_ids.shape
    valid = segment_ids != 0
    prev = jnp.concatenate([jnp.full((b, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], 1)
    start = valid & (segment_ids != prev)  # [B, T]
    n_valid = valid.sum(-1).astype(jnp.int32)  # [B]

    def row(start_row, n):
        offs = jnp.nonzero(start_row, size=max_segments + 1, fill_value=-1)[0].astype(jnp.int32)
        nxt = jnp.where(offs[1:] >= 0, offs[1:], n)  # [M]: next start, or the end of real tokens
        lengths = jnp.where(offs[:-1] >= 0, nxt - offs[:-1], -1)
        return offs, lengths

    return jax.vmap(row)(start, n_valid)


def attention_cudnn(q, k, v, segment_ids=None, *, scale: float, window: int | None = None,
                    max_segments: int | None = None):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D*] bf16/fp16; segment_ids [B, T] or None (one causal
    sequence per row) -> o [B, T, Hq, Dv]."""
    mod = cudnn_entry()
    if mod is None:
        raise RuntimeError(f"attention: impl='cudnn' needs {_MODULE}.dot_product_attention with "
                           f"q/kv offsets; this jax ({jax.__version__}) has none")
    if q.dtype not in _HALF or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: impl='cudnn' needs bfloat16 or float16 q/k/v of one dtype, "
                        f"got {q.dtype}/{k.dtype}/{v.dtype}")
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"attention: impl='cudnn' runs on a CUDA GPU only, the backend is "
                           f"{jax.default_backend()!r}")
    kw = dict(scale=float(scale), sliding_window_length=window)
    if segment_ids is None:
        return mod.dot_product_attention(q, k, v, mask_type=mod.MaskType.CAUSAL, **kw)
    t = q.shape[1]
    m = t if max_segments is None else max_segments
    if not 1 <= m <= t:
        raise ValueError(f"attention: max_segments must be in [1, T={t}], got {max_segments}")
    offsets, lengths = segment_offsets(segment_ids, m)
    valid = (segment_ids != 0)[:, :, None, None]  # [B, T, 1, 1]
    q, k, v = (jnp.where(valid, x, jnp.zeros_like(x)) for x in (q, k, v))
    o = mod.dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                  mask_type=mod.MaskType.PADDING_CAUSAL, **kw)
    return jnp.where(valid, o, jnp.zeros_like(o))


def attention_cudnn_entry(q, k, v, *, initial_state=None, segment_ids=None,
                          output_final_state=False, scale, window):
    """The op frame's contract for "cudnn" (see ops.py)."""
    return attention_cudnn(q, k, v, segment_ids, scale=scale, window=window), None
