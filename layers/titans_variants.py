"""Titans with attention: memory as a gate (`titans_mag`) and memory as context (`titans_mac`).

Both use the memory core of `layers/titans.py` (NeuralMemory: M_t, y_mem,t = M_t(q_t)) and a
softmax attention whose keys start with P learned persistent tokens (per head, P × [k, v]),
visible to every real query (`attention(..., kv_sinks=P)`); they carry no rotary rotation.

**MAG** (memory as a gate). Two branches over the same input, combined per feature by a learned,
data-dependent convex gate:

    a   = SWA_w([persistent ‖ x])                      # sliding window w = cfg.window, RoPE
    g   = σ(x W_mix + b_mix)                           # [B, T, H·D]
    y   = g ⊙ RMSNorm_head(y_mem) + (1 − g) ⊙ RMSNorm_head(a)
    out = (y ⊙ SiLU(x W_gate)) W_o

(the convex form was chosen over the paper's y = a ⊗ σ(mem): either branch can take over a
feature, and g = 1/2 at init keeps both branches' gradients alive.)

**MAC** (memory as context). Each document is cut into segments of C tokens (C = cfg.window by
default; segment s of a document holds its positions [sC, sC + C)). A token t of segment s reads
the memory as it was at the segment's start,

    r_t = M_{start(s)}(q_t)        (M_{start} = the memory after every token before the segment)

and attends causally over [persistent ‖ read-out tokens of s ‖ tokens of s]: with
h_t = RMSNorm_head(r_t), read-out token t has key RoPE(h_t W_hk) and value h_t W_hv, and query t
sees read-out tokens and tokens u of its segment with u ≤ t (a read-out token depends on q_u, so
it is only visible from position u on: every output stays causal). The memory itself is updated
with every token's (k, v), as in `Titans`; the first segment of a document reads memory0.

    out = (RMSNorm_head(attn) ⊙ SiLU(x W_gate)) W_o

Computing r_t: segments are per document, so they do not align with a fixed grid when documents
are packed. The layer scans over grid chunks of C tokens carrying (op state, snapshot = the read
memory of the segment running into the chunk). Within a grid chunk a token reads memory0 (first
segment of its document), the snapshot (its segment began before the chunk), or M_mid, the memory
at the one segment start that can fall inside the chunk (that of the document running into it);
M_mid is the final state of an op call over the chunk with the tokens from that start on masked
as trailing padding, and a second op call over the whole chunk advances the state. The attention
is block-local: queries of grid chunk j only see keys of chunks j − 1 and j.

Caches. MAG: memory state, conv inputs, and a ring buffer of w keys/values (as `Attention`).
MAC: memory state, conv inputs, the snapshot, the document length, and a ring buffer of the last C
tokens' keys/values and read-out keys/values with their positions (a query keeps only those of
its own segment, id = position // C). Decoding a token at position p reads the current memory if
p mod C = 0 (it becomes the snapshot) and the snapshot otherwise; prefill with a cache runs the
chunk scan from the cached state. Rows of different lengths (right padding, segment_ids 0) prefill
in one call; prefill + decode equals the full pass.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import (GatedRMSNorm, Linear, RMSNorm, make_param, mean_causal_keys,
                           positions_from_segments, rotary_embedding, valid_lengths)
from layers.attention import init_kv_cache, kv_cache_bytes, write_kv_cache
from layers.titans import MemoryOptions, NeuralMemory, memory_read
from pallas_kernels.attention import attention
from pallas_kernels.common import pad_axis
from pallas_kernels.titans import init_state, titans

__all__ = ["Read", "SinkAttention", "TitansMAG", "TitansMAC"]

class Read(enum.IntEnum):
    """Which memory a MAC token reads in `_mac_reads` (its segment's start memory):

    FIRST     memory0: the token is in the first segment of its document;
    SNAPSHOT  the snapshot carried into the grid chunk: its segment began before the chunk
              (also the label of padding tokens, whose read is never used);
    MID       M_mid, the memory at the one segment start inside the chunk.

    The same labels say how a chunk updates the snapshot it hands on, from the label of its last
    real token: FIRST resets it to memory0, MID replaces it by M_mid, SNAPSHOT keeps it (also
    for a chunk without real tokens). Stored as int32 arrays, compared with `==`.
    """
    FIRST = 0
    SNAPSHOT = 1
    MID = 2


def _where_rows(cond, a, b):
    """where with a per-row condition cond [B] over arrays [B, ...]."""
    return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)


def _pad_time(x, multiple: int, value=0):
    return pad_axis(x, 1, multiple, value=value)


class SinkAttention(nnx.Module):
    """q, k, v projections with rotary embedding, and P learned persistent tokens (sinks)."""

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int, n_persistent: int = 4,
                 rope_theta: float = 10000.0, impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.h, self.d, self.p, self.rope_theta = num_heads, head_dim, n_persistent, rope_theta
        self.impl = "reference" if impl == "reference" else "auto"
        hd = num_heads * head_dim
        lin = lambda: Linear(d_model, hd, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(), lin(), lin()
        if n_persistent:
            shape, axes = (n_persistent, num_heads, head_dim), (None, "heads", None)
            init = nnx.initializers.normal(1.0)
            self.persistent_k = make_param(rngs, init, shape, axes)
            self.persistent_v = make_param(rngs, init, shape, axes)

    def project(self, x, positions):
        """x [B, T, d_model], positions [B, T] -> q, k, v [B, T, H, D] (q, k rotated)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.h, self.d)
        k = self.k_proj(x).reshape(b, t, self.h, self.d)
        v = self.v_proj(x).reshape(b, t, self.h, self.d)
        return (rotary_embedding(q, positions, theta=self.rope_theta),
                rotary_embedding(k, positions, theta=self.rope_theta), v)

    def flops_per_token(self, mean_keys: float) -> float:
        """3·2·d·H·D (q, k, v) + 4·H·D·(mean_keys + P): q·k and p·v over the P persistent tokens
        and `mean_keys` other keys per query on average."""
        projs = sum(p.flops_per_token() for p in (self.q_proj, self.k_proj, self.v_proj))
        return float(projs + 4 * self.h * self.d * (mean_keys + self.p))

    def attend(self, q, k, v, *, q_pos, kv_pos, q_seg, kv_seg, window=None):
        """attention(q, [sinks ‖ k], [sinks ‖ v]); q [B, Tq, H, D], k/v [B, Tk, H, D] with their
        positions and segment ids [B, T*] (the sinks are visible to every real query)."""
        sinks = (self.persistent_k[...], self.persistent_v[...]) if self.p else None
        return _sink_attention(q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, window=window,
                               impl=self.impl)


@functools.partial(jax.jit, static_argnames=("window", "impl"))
def _sink_attention(q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, *, window, impl):
    """The attention op with the persistent tokens (sinks: ([P, H, D], [P, H, D]) or None)
    prepended to the keys. Jitted: one program per shape for eager callers."""
    p = 0
    if sinks is not None:
        b, p = q.shape[0], sinks[0].shape[0]
        sink = lambda w: jnp.broadcast_to(w.astype(k.dtype), (b,) + w.shape)
        k = jnp.concatenate([sink(sinks[0]), k], axis=1)  # [B, P + Tk, H, D]
        v = jnp.concatenate([sink(sinks[1]), v], axis=1)
        kv_pos = jnp.concatenate([jnp.zeros((b, p), kv_pos.dtype), kv_pos], axis=1)
        kv_seg = jnp.concatenate([jnp.ones((b, p), kv_seg.dtype), kv_seg], axis=1)
    return attention(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
                     kv_positions=kv_pos, window=window, kv_sinks=p, impl=impl)


@functools.partial(jax.jit, static_argnames=("c", "block_size", "impl", "activation"))
def _mac_reads(q, k, v, theta, eta, alpha, doc_pos, op_seg, valid, reset, state, snapshot, mem0,
               *, c, block_size, impl, activation):
    """The MAC read-out scan (`TitansMAC._segment_reads`) on inputs padded to N·C tokens.

    Jitted so that eager calls compile one program per padded length (a no-op under jit)."""
    b, t = q.shape[:2]
    n = t // c
    idx = jnp.arange(t, dtype=jnp.int32)[None]  # [1, N*C]
    seg_start = idx - doc_pos % c  # row index of the token's segment start
    chunk_start = idx // c * c
    # [B, N*C] int32 `Read` label of every token
    read = jnp.where(doc_pos < c, Read.FIRST,
                     jnp.where(seg_start < chunk_start, Read.SNAPSHOT, Read.MID))
    read = jnp.where(valid, read, Read.SNAPSHOT).astype(jnp.int32)
    off = (idx - chunk_start).reshape(1, n, c)
    # The one segment start inside each chunk (offset e): M_mid is the state after the tokens
    # before it, the final state of an op call with the tokens from e on masked as padding.
    e = jnp.max(jnp.where((read == Read.MID).reshape(b, n, c),
                          (seg_start - chunk_start).reshape(b, n, c), 0), axis=-1)  # [B, N]
    seg_c = op_seg.reshape(b, n, c)
    seg_mid = jnp.where(off < e[..., None], seg_c, 0)
    vc = valid.reshape(b, n, c)
    last = jnp.maximum(jnp.max(jnp.where(vc, jnp.arange(c), -1), axis=-1), 0)  # [B, N]
    # [B, N] how each chunk updates the snapshot: the label of its last real token (`Read`)
    hand_on = jnp.take_along_axis(read.reshape(b, n, c), last[..., None], -1)[..., 0]
    hand_on = jnp.where(vc.any(-1), hand_on, Read.SNAPSHOT)  # an empty chunk keeps the snapshot
    rst0 = reset.reshape(b, n, c)[..., 0]  # a document starts at the chunk's first token

    def chunks(z):  # [B, N*C, ...] -> [N, B, C, ...]
        return jnp.moveaxis(z.reshape((b, n, c) + z.shape[2:]), 1, 0)

    xs = (tuple(chunks(z) for z in (q, k, v, theta, eta, alpha)),
          jnp.moveaxis(jnp.concatenate([seg_mid, seg_c], axis=0), 1, 0), chunks(read),
          hand_on.T, rst0.T)
    fresh = init_state(mem0, b)
    twice = lambda z: jnp.concatenate([z, z], axis=0)  # rows [masked at e | whole chunk]

    def body(carry, x):
        st, snap = carry
        inputs, seg2, read_c, hand, rst = x
        st = jax.tree.map(lambda f, s: _where_rows(rst, f, s), fresh, st)
        # One op call for both: the masked chunk (-> M_mid) and the whole chunk (-> next state).
        _, st2 = titans(*(twice(z) for z in inputs), mem0, block_size=block_size,
                        initial_state=jax.tree.map(twice, st), output_final_state=True,
                        segment_ids=seg2, impl=impl, activation=activation)
        m_mid = {name: w[:b] for name, w in st2["memory"].items()}
        st_end = jax.tree.map(lambda z: z[b:], st2)
        qc = inputs[0]
        r = jnp.where((read_c == Read.MID)[..., None, None], memory_read(m_mid, qc, activation),
                      memory_read(snap, qc, activation))  # [B, C, H, D]
        new_snap = {name: _where_rows(hand == Read.MID, m_mid[name], _where_rows(
            hand == Read.FIRST, jnp.broadcast_to(w, snap[name].shape), snap[name]))
            for name, w in mem0.items()}
        return (st_end, new_snap), r

    (state, snapshot), r = jax.lax.scan(body, (state, snapshot), xs)
    r = jnp.moveaxis(r, 0, 1).reshape((b, t) + r.shape[3:])  # [B, N*C, H, D]
    r = jnp.where((read == Read.FIRST)[..., None, None], memory_read(mem0, q, activation), r)
    return r, state, snapshot


class _TitansAttentionBase(nnx.Module):
    """Shared construction: memory core, sink attention, output gate and projection."""

    def __init__(self, d_model, *, num_heads, head_dim, n_persistent, rope_theta, memory, impl,
                 dtype, rngs):
        self.memory = NeuralMemory(d_model, num_heads=num_heads, head_dim=head_dim, memory=memory,
                                   impl=impl, dtype=dtype, rngs=rngs)
        self.h, self.d, self.dtype = num_heads, self.memory.d, dtype
        hd = num_heads * self.d
        self.attn = SinkAttention(d_model, num_heads=num_heads, head_dim=self.d,
                                  n_persistent=n_persistent, rope_theta=rope_theta, impl=impl,
                                  dtype=dtype, rngs=rngs)
        self.g_proj = Linear(d_model, hd, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o_proj = Linear(hd, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def _memory_branch(self, x, segment_ids, cache):
        return self.memory.project(x, segment_ids=segment_ids,
                                   conv_cache=None if cache is None else cache["conv"])


class TitansMAG(_TitansAttentionBase):
    """Memory as a gate: y = g ⊙ norm(M_t(q_t)) + (1 − g) ⊙ norm(SWA(x)) (module docstring)."""

    def __init__(self, d_model: int, *, num_heads: int, window: int, head_dim: int | None = None,
                 n_persistent: int = 4, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 memory: MemoryOptions = MemoryOptions(), impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        """``memory``: the memory core's settings (`layers.titans.MemoryOptions`)."""
        if window < 1:
            raise ValueError(f"TitansMAG: window must be a positive int, got {window}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim,
                         n_persistent=n_persistent, rope_theta=rope_theta, memory=memory,
                         impl=impl, dtype=dtype, rngs=rngs)
        self.window = window
        hd = num_heads * self.d
        self.mix_proj = Linear(d_model, hd, axes=("embed", "heads"), use_bias=True,
                               init_scale=0.1, dtype=dtype, rngs=rngs)
        self.mem_norm = RMSNorm(self.d, eps=norm_eps, dtype=jnp.float32)
        self.attn_norm = RMSNorm(self.d, eps=norm_eps, dtype=jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        slots = min(self.window, max_len)
        return {"conv": self.memory.init_conv_cache(batch, dtype),
                "memory": self.memory.init_state(batch),
                "attn": init_kv_cache(batch, slots, ("k", "v"), self.h, self.d, dtype),
                "length": jnp.zeros((batch,), jnp.int32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row, as `init_cache` holds it: the memory state 12·H·P + 4 and conv inputs
        (conv_size − 1)·3·H·D·itemsize of the q, k, v convs (as `Titans`), the ring of S = min(context_len, w) slots
        2·S·H·D·itemsize(dtype) + 4·S (slot_pos), + 4 (length). Saturates at S = w."""
        slots = min(self.window, context_len)
        return (self.memory.state_bytes() + self.memory.conv.cache_bytes(dtype)
                + kv_cache_bytes(slots, 2, self.h, self.d, dtype) + 4)

    def flops_per_token(self, seq_len: int) -> float:
        """The memory core (`NeuralMemory.flops_per_token`) + the sink attention's q, k, v
        3·2·d·H·D and mixing 4·H·D·(P + mean_causal_keys(T, w)) + 2·d·H·D (mix gate)
        + 2·d·H·D (output gate) + 2·H·D·d (o). Norms and gates' elementwise work are O(d)."""
        projs = sum(p.flops_per_token() for p in (self.mix_proj, self.g_proj, self.o_proj))
        attn = self.attn.flops_per_token(mean_causal_keys(seq_len, self.window))
        return float(self.memory.flops_per_token() + attn + projs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        q, k, v, gates, conv_cache = self._memory_branch(x, segment_ids, cache)
        y_mem, state = self.memory.recur(q, k, v, gates, segment_ids=segment_ids,
                                         state=None if cache is None else cache["memory"])
        new_cache = None
        if cache is None:
            if positions is None:
                positions = (positions_from_segments(segment_ids) if segment_ids is not None
                             else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
            qa, ka, va = self.attn.project(x, positions)
            idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
            a = self.attn.attend(qa, ka, va, q_pos=idx, kv_pos=idx, q_seg=seg, kv_seg=seg,
                                 window=self.window)  # [B, T, H, D]
        else:
            valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
            n_new = valid_lengths(segment_ids, b, t)
            q_pos = cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
            qa, ka, va = self.attn.project(x, q_pos)
            ring = cache["attn"]
            kv_pos = jnp.concatenate([ring["slot_pos"], jnp.where(valid, q_pos, -1)], axis=1)
            a = self.attn.attend(
                qa, jnp.concatenate([ring["k"].astype(ka.dtype), ka], axis=1),
                jnp.concatenate([ring["v"].astype(va.dtype), va], axis=1), q_pos=q_pos,
                kv_pos=kv_pos, q_seg=valid.astype(jnp.int32),
                kv_seg=(kv_pos >= 0).astype(jnp.int32), window=self.window)
            new_cache = {"conv": conv_cache, "memory": state,
                         "attn": write_kv_cache(ring, {"k": ka, "v": va}, q_pos, valid, n_new),
                         "length": cache["length"] + n_new}
        g = jax.nn.sigmoid(self.mix_proj(x).astype(jnp.float32)).reshape(b, t, self.h, self.d)
        y = g * self.mem_norm(y_mem) + (1.0 - g) * self.attn_norm(a)  # [B, T, H, D]
        y = y.reshape(b, t, -1) * jax.nn.silu(self.g_proj(x).astype(jnp.float32))
        return self.o_proj(y.astype(self.dtype)), new_cache


class TitansMAC(_TitansAttentionBase):
    """Memory as context: attention over [persistent ‖ M_{segment start}(q) ‖ segment]."""

    def __init__(self, d_model: int, *, num_heads: int, segment_len: int,
                 head_dim: int | None = None, n_persistent: int = 4, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-5, memory: MemoryOptions = MemoryOptions(),
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        """``memory``: the memory core's settings (`layers.titans.MemoryOptions`)."""
        if segment_len < 1:
            raise ValueError(f"TitansMAC: segment_len must be a positive int, got {segment_len}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim,
                         n_persistent=n_persistent, rope_theta=rope_theta, memory=memory,
                         impl=impl, dtype=dtype, rngs=rngs)
        self.segment_len = segment_len
        hd = num_heads * self.d
        self.read_norm = RMSNorm(self.d, eps=norm_eps, dtype=dtype)
        self.read_k = Linear(hd, hd, axes=(None, "heads"), dtype=dtype, rngs=rngs)
        self.read_v = Linear(hd, hd, axes=(None, "heads"), dtype=dtype, rngs=rngs)
        self.o_norm = GatedRMSNorm(hd, group_size=self.d, eps=norm_eps, dtype=dtype)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        mem0 = self.memory.memory0()
        return {"conv": self.memory.init_conv_cache(batch, dtype),
                "memory": self.memory.init_state(batch),
                "snapshot": {n: jnp.broadcast_to(w, (batch,) + w.shape) for n, w in mem0.items()},
                "attn": init_kv_cache(batch, self.segment_len, ("hk", "hv", "k", "v"), self.h,
                                   self.d, dtype),
                "length": jnp.zeros((batch,), jnp.int32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row, independent of context_len (`init_cache` always keeps C slots): the memory
        state 12·H·P + 4 and conv inputs (conv_size − 1)·3·H·D·itemsize (as `Titans`), the
        snapshot 4·H·P (float32), the ring of C slots of read-out and token keys/values
        4·C·H·D·itemsize(dtype) + 4·C (slot_pos), + 4 (length)."""
        c = self.segment_len
        return (self.memory.state_bytes() + self.memory.conv.cache_bytes(dtype)
                + 4 * self.h * self.memory.memory_size()[0]
                + kv_cache_bytes(c, 4, self.h, self.d, dtype) + 4)

    def flops_per_token(self, seq_len: int) -> float:
        """The memory core (`NeuralMemory.flops_per_token`; its one read is r_t = M_start(q_t))
        + read-out keys/values 2·2·H·D·H·D + the sink attention's q, k, v 3·2·d·H·D and mixing
        4·H·D·(P + 2·n̄), where a query at offset o of its segment sees o + 1 read-out tokens and
        o + 1 tokens, n̄ = (1/T) Σ_{t<T} ((t mod C) + 1) over a document of T = seq_len tokens,
        + 2·d·H·D (gate) + 2·H·D·d (o). Norms are O(d), not counted."""
        t, c = seq_len, self.segment_len
        n, r = divmod(t, c)
        mean_keys = (n * c * (c + 1) / 2 + r * (r + 1) / 2) / t
        projs = sum(p.flops_per_token() for p in (self.read_k, self.read_v, self.g_proj,
                                                   self.o_proj))
        return float(self.memory.flops_per_token() + self.attn.flops_per_token(2 * mean_keys)
                     + projs)

    # -- memory read-outs ---------------------------------------------------------------------

    def _segment_reads(self, q, k, v, gates, *, valid, reset, doc_pos, op_seg, state, snapshot):
        """r_t = M_{start of t's segment}(q_t) by a scan over grid chunks of C tokens.

        q, k, v [B, T, H, D]; gates 3 x [B, T, H]; valid, reset [B, T] bool (reset: a document
        starts at t > 0); doc_pos [B, T] position in the document; op_seg [B, T] ids for the op
        (0 = padding); state / snapshot: op state and read memory before token 0.
        Returns (r [B, T, H, D] f32, final op state, final snapshot)."""
        t = q.shape[1]
        c = self.segment_len
        padded = [_pad_time(z, c) for z in (q, k, v, *gates, doc_pos, op_seg)]
        padded += [_pad_time(valid, c, False), _pad_time(reset, c, False)]
        r, state, snapshot = _mac_reads(*padded, state, snapshot, self.memory.memory0(), c=c,
                                        block_size=self.memory.block_size,
                                        impl=self.memory.impl,
                                        activation=self.memory.activation)
        return r[:, :t], state, snapshot

    def _read_tokens(self, r, positions):
        """Read-out tokens: keys RoPE(h W_hk), values h W_hv with h = RMSNorm_head(r)."""
        b, t = r.shape[:2]
        h = self.read_norm(r).reshape(b, t, -1)
        hk = rotary_embedding(self.read_k(h).reshape(b, t, self.h, self.d), positions,
                              theta=self.attn.rope_theta)
        return hk, self.read_v(h).reshape(b, t, self.h, self.d)

    # -- forward ------------------------------------------------------------------------------

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        c = self.segment_len
        q, k, v, gates, conv_cache = self._memory_branch(x, segment_ids, cache)
        if cache is None:
            valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
            op_seg = valid.astype(jnp.int32) if segment_ids is None else segment_ids
            prev = jnp.concatenate([op_seg[:, :1], op_seg[:, :-1]], axis=1)
            doc_pos = (positions_from_segments(segment_ids) if segment_ids is not None
                       else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
            r, _, _ = self._segment_reads(
                q, k, v, gates, valid=valid, reset=valid & (op_seg != prev), doc_pos=doc_pos,
                op_seg=op_seg, state=self.memory.init_state(b),
                snapshot={n: jnp.broadcast_to(w, (b,) + w.shape)
                          for n, w in self.memory.memory0().items()})
            rot = doc_pos if positions is None else positions
            hk, hv = self._read_tokens(r, rot)
            qa, ka, va = self.attn.project(x, rot)
            # One id per (document, segment): segments start where doc_pos % C == 0.
            ids = jnp.where(valid, jnp.cumsum(valid & (doc_pos % c == 0), axis=1), 0)
            o = self._local_attend(qa, hk, hv, ka, va, doc_pos, ids.astype(jnp.int32))
            new_cache = None
        else:
            o, new_cache = self._cached(x, q, k, v, gates, segment_ids, conv_cache, cache)
        o = self.o_norm(o.reshape(b, t, -1), self.g_proj(x))
        return self.o_proj(o), new_cache

    def _local_attend(self, qa, hk, hv, ka, va, pos, ids):
        """Block-local form: queries of grid chunk j see keys of chunks j − 1 and j only (a
        segment spans at most two chunks). Inputs [B, T, H, D] / [B, T]; returns [B, T, H, D]."""
        b, t = qa.shape[:2]
        c = self.segment_len
        n = -(-t // c)
        if n == 1:
            return self.attn.attend(qa, jnp.concatenate([hk, ka], 1),
                                    jnp.concatenate([hv, va], 1), q_pos=pos,
                                    kv_pos=jnp.concatenate([pos, pos], 1), q_seg=ids,
                                    kv_seg=jnp.concatenate([ids, ids], 1))
        qa, hk, hv, ka, va, pos, ids = (_pad_time(z, c) for z in (qa, hk, hv, ka, va, pos, ids))

        def blocks(z):  # [B, N*C, ...] -> [B*N, C, ...]
            return z.reshape((b * n, c) + z.shape[2:])

        def pairs(z):  # keys of chunks j-1 and j: [B, N*C, ...] -> [B*N, 2C, ...]
            zb = z.reshape((b, n, c) + z.shape[2:])
            prev = jnp.concatenate([jnp.zeros_like(zb[:, :1]), zb[:, :-1]], axis=1)
            return jnp.concatenate([prev, zb], axis=2).reshape((b * n, 2 * c) + z.shape[2:])

        o = self.attn.attend(blocks(qa), jnp.concatenate([pairs(hk), pairs(ka)], 1),
                             jnp.concatenate([pairs(hv), pairs(va)], 1), q_pos=blocks(pos),
                             kv_pos=jnp.concatenate([pairs(pos)] * 2, 1), q_seg=blocks(ids),
                             kv_seg=jnp.concatenate([pairs(ids)] * 2, 1))  # [B*N, C, H, D]
        return o.reshape((b, n * c) + o.shape[2:])[:, :t]

    def _cached(self, x, q, k, v, gates, segment_ids, conv_cache, cache):
        """Prefill (any T, right padding) or decode (T = 1) from a cache."""
        b, t, _ = x.shape
        c = self.segment_len
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        n_new = valid_lengths(segment_ids, b, t)
        length = cache["length"]
        q_pos = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
        if t == 1 and segment_ids is None:  # decode: read, then one step of the memory
            starts = length % c == 0  # a new segment: read (and keep) the current memory
            snapshot = {n: _where_rows(starts, m, cache["snapshot"][n])
                        for n, m in cache["memory"]["memory"].items()}
            r = memory_read(snapshot, q, self.memory.activation)  # [B, 1, H, D]
            _, state = self.memory.recur(q, k, v, gates, state=cache["memory"])
        else:
            r, state, snapshot = self._segment_reads(
                q, k, v, gates, valid=valid, reset=jnp.zeros((b, t), bool), doc_pos=q_pos,
                op_seg=valid.astype(jnp.int32), state=cache["memory"],
                snapshot=cache["snapshot"])
        hk, hv = self._read_tokens(r, q_pos)
        qa, ka, va = self.attn.project(x, q_pos)
        ring = cache["attn"]
        kv_pos = jnp.concatenate([ring["slot_pos"], jnp.where(valid, q_pos, -1)], axis=1)
        kv_pos = jnp.concatenate([kv_pos, kv_pos], axis=1)  # read-out tokens, then tokens
        cat = lambda a, bb, name: jnp.concatenate(
            [ring["h" + name].astype(a.dtype), a, ring[name].astype(bb.dtype), bb], axis=1)
        o = self.attn.attend(qa, cat(hk, ka, "k"), cat(hv, va, "v"), q_pos=q_pos, kv_pos=kv_pos,
                             q_seg=jnp.where(valid, q_pos // c + 1, 0),
                             kv_seg=jnp.where(kv_pos >= 0, kv_pos // c + 1, 0))
        new_ring = write_kv_cache(ring, {"hk": hk, "hv": hv, "k": ka, "v": va}, q_pos, valid, n_new)
        return o, {"conv": conv_cache, "memory": state, "snapshot": snapshot, "attn": new_ring,
                   "length": length + n_new}
