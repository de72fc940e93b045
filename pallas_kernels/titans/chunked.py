"""Titans memory, block-parallel form for training (pure JAX, float32 inside).

Exactly the recurrence of ``reference.py`` for the same gradient block size ``b``, computed one
grid block of ``C = b`` tokens at a time by a ``lax.scan`` whose body is checkpointed (the
backward pass recomputes a block from its carry: one state per block is stored, not per token).

**Gradients as outer products.** All tokens of a gradient block take their gradient at the same
memory ``R`` (the block start), so they are computed in parallel. For layer ``l`` with input
``x_l`` (``x_0 = k``), pre-activation ``z_l = x_l W_l`` and ``x_{l+1} = act(z_l)``,

    e_{L-1} = 2 (z_{L-1} - v),  e_l = (e_{l+1} W_{l+1}^T) * act'(z_l),  G_{l,s} = x_{l,s} e_{l,s}^T

(linear memory, L = 1: ``G_s = 2 k_s (k_s W - v_s)^T``). No per-token copy of a weight is built.

**Coefficients.** Inside a block, with per-token factors eta_r, a_r = 1 - alpha_r and the carried
(M_c, S_c), unrolling S_t = eta_t S_{t-1} - theta_t G_t and M_t = a_t M_{t-1} + S_t gives

    P[t, s] = prod_{r=s+1..t} eta_r,  A[t, u] = prod_{r=u+1..t} a_r   (s, u <= t; 1 on the diagonal)
    S_t = p0_t S_c - sum_s P[t, s] theta_s G_s                         p0_t = prod_{r<=t} eta_r
    M_t = a0_t M_c + c_t S_c - sum_s D[t, s] G_s                       a0_t = prod_{r<=t} a_r
          c = A p0,   D = (A P) * theta[None, :]

P and A are cumulative products of masked [C, C] matrices (``_transfer``: exact for eta = 0 or
a = 0, no division, no logs). They, and everything else that depends only on the gates and the
document layout, are computed for all blocks at once before the scan (``_plan``). The outputs
never form M_t: layer by layer, with ``h_t`` the query's input to the layer (h_0 = q),

    z_t = a0_t h_t M_c + c_t h_t S_c - sum_s D[t, s] (h_t . x_s) e_s        (h_{l+1} = act(z_l))

i.e. ``((H X^T) * D) E`` -- attention-like matmuls over the block; the block's end state is
``a0 M_c + c S_c - X^T diag(D[C-1]) E`` (and likewise for S).

**Packing, continued states, padding.** A reset (first token of a document) zeroes eta and a at
that token and injects ``(1 - alpha_r) memory0`` (coefficient ``w = A inj``); padding tokens get
eta = a = 1, theta = 0, add no S_u to M (rows u of P and p0 are masked) and output 0. A grid
block can then hold tokens taking their gradient at three different memories: the carried block
start ``R`` (tokens of the document running into the grid block whose gradient block began
before it), ``M_mid`` = M at offset ``b - pos - 1`` (that document's next gradient block, which
starts inside the grid block; M_mid comes from the first group's gradients, then the group's own
gradients are taken at it), and ``memory0`` (documents starting inside the grid block, whose
first gradient block reaches past its end; these gradients are computed for all tokens before
the scan). Within one document gradient blocks are b long, so no grid block has a second
boundary of the M_mid kind. The M_mid and memory0 passes exist only when needed: with no
``segment_ids`` and a fresh state (pos = 0) every grid block is exactly one gradient block.

**b = 1.** The MLP memory has no parallel form for b = 1 (every token's gradient needs the
previous token's memory); this form then degenerates to a checkpointed token scan, still equal to
the reference. (So does the linear memory: its b = 1 case is a delta rule with momentum.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_axis
from pallas_kernels.titans.reference import TitansState

__all__ = ["titans_chunked", "LinearFactors", "linear_kernel_factors", "run_linear_kernels"]


def _token_grads(ws, k, v, act):
    """Outer-product factors of the per-token gradients at weights ``ws``.

    ws: L x [B, H, d_l, d_{l+1}] (batch dim may be 1); k [B, H, C, Dk]; v [B, H, C, Dv].
    Returns (xs, es): L x [B, H, C, d_l] and L x [B, H, C, d_{l+1}], G_{l,s} = xs[l][s] es[l][s]^T.
    """
    n = len(ws)
    xs, zs = [], []
    h = k
    for l, w in enumerate(ws):
        xs.append(h)
        z = jnp.einsum("bhci,bhio->bhco", h, jnp.broadcast_to(w, h.shape[:2] + w.shape[2:]))
        zs.append(z)  # [B, H, C, d_{l+1}]
        if l < n - 1:
            h = act(z)
    es = [None] * n
    e = 2.0 * (zs[-1] - v)  # [B, H, C, Dv]
    es[-1] = e
    for l in range(n - 2, -1, -1):
        w = jnp.broadcast_to(ws[l + 1], e.shape[:2] + ws[l + 1].shape[2:])
        back = jnp.einsum("bhco,bhio->bhci", e, w)  # [B, H, C, d_{l+1}]
        _, dact = jax.jvp(act, (zs[l],), (jnp.ones_like(zs[l]),))
        e = back * dact
        es[l] = e
    return xs, es


def _transfer(f):
    """F[..., t, s] = prod_{r=s+1..t} f[..., r] for t >= s (1 on the diagonal), 0 above it.

    A cumulative product down the columns of a matrix holding f_t below the diagonal and 1 on and
    above it: exact for zero factors, no division or logs (jax differentiates cumprod with an
    associative scan of products). [..., C] -> [..., C, C].
    """
    c = f.shape[-1]
    t = jnp.arange(c)[:, None]
    s = jnp.arange(c)[None, :]
    x = jnp.where(t > s, f[..., :, None], 1.0)  # [..., C, C]
    return jnp.where(t >= s, jnp.cumprod(x, axis=-2), 0.0)


def _select(mask, a, b):
    """Per-token choice: mask [B, C] bool; a, b [B, H, C, d]."""
    return jnp.where(mask[:, None, :, None], a, b)


def _outer_sum(xs, es, coef):
    """sum_s coef[s] x_s e_s^T: xs [B, H, C, i], es [B, H, C, o], coef [B, H, C] -> [B, H, i, o]."""
    return jnp.einsum("bhci,bhco->bhio", xs * coef[..., None], es)


def _memory_at(a0, c, w, d_row, mem, mom, mem0, xs, es):
    """M_t for one row t of a block: a0, c, w [B, H] (w None: no reset), d_row [B, H, C]."""
    out = []
    for l in range(len(mem)):
        m = a0[..., None, None] * mem[l] + c[..., None, None] * mom[l]
        if w is not None:
            m = m + w[..., None, None] * mem0[l]
        out.append(m - _outer_sum(xs[l], es[l], d_row))  # [B, H, d_l, d_{l+1}]
    return tuple(out)


# Which memory is the block start after a grid block: the carried one, M_mid, M_end or memory0.
_KEEP, _MID, _END, _MEM0 = 0, 1, 2, 3


def _row(x, idx):
    """x[..., idx, ...] along axis 3 of x [B, H, N, C, ...] for idx [B, N] -> [B, H, N, ...]."""
    onehot = (jnp.arange(x.shape[3]) == idx[..., None]).astype(x.dtype)  # [B, N, C]
    onehot = onehot.reshape(idx.shape[:1] + (1,) + onehot.shape[1:] + (1,) * (x.ndim - 4))
    return jnp.sum(x * onehot, axis=3)


def _plan(theta, eta, alpha, valid, reset, pos0, block_size, track_mid):
    """Everything that depends on gates and masks only, for all grid blocks at once.

    theta, eta, alpha [B, H, N, C] f32; valid, reset [B, N*C] bool (reset None: no packing);
    pos0 [B]. Returns (coefficients dict, per-block masks / codes, final pos [B]).
    """
    bsz, _, n, c_len = theta.shape
    t_len = n * c_len
    valb = valid.reshape(bsz, 1, n, c_len)
    keep = 1.0 - alpha
    eta_e = jnp.where(valb, eta, 1.0)  # [B, H, N, C]; padding: a no-op
    dec_e = jnp.where(valb, keep, 1.0)
    th_e = jnp.where(valb, theta, 0.0)
    inj = None
    if reset is not None:  # a reset cuts both chains and injects (1 - alpha) memory0
        rstb = reset.reshape(bsz, 1, n, c_len)
        eta_e = jnp.where(rstb, 0.0, eta_e)
        dec_e = jnp.where(rstb, 0.0, dec_e)
        inj = jnp.where(rstb & valb, keep, 0.0)
    pmat = _transfer(eta_e)  # [B, H, N, C, C]
    amat = _transfer(dec_e)
    vf = valb.astype(jnp.float32)  # M_u adds S_u only at real tokens: mask rows u of P, p0
    p0 = pmat[..., 0] * eta_e[..., :1]  # [B, H, N, C], prod_{r<=t} eta_r
    a0 = amat[..., 0] * dec_e[..., :1]
    dmat = jnp.einsum("bhntu,bhnus->bhnts", amat, pmat * vf[..., None]) * th_e[..., None, :]
    co = dict(a0=a0, c=jnp.einsum("bhntu,bhnu->bhnt", amat, p0 * vf), d=dmat,
              a0_end=a0[..., -1], c_end=None, d_end=dmat[..., -1, :],
              p0_end=p0[..., -1], dp_end=pmat[..., -1, :] * th_e)
    co["c_end"] = co["c"][..., -1]
    if inj is not None:
        co["w"] = jnp.einsum("bhntu,bhnu->bhnt", amat, inj)
        co["w_end"] = co["w"][..., -1]

    # Positions: doc_start (-pos0 for the row's first document) and block start of each token.
    t_idx = jnp.arange(t_len)
    first = -pos0[:, None]
    doc_start = jnp.broadcast_to(first, (bsz, t_len))
    reset_start = jnp.full((bsz, t_len), -1)  # start of the token's document if reset, else -1
    if reset is not None:
        reset_start = jax.lax.cummax(jnp.where(reset, t_idx, -1), axis=1)  # [B, T]
        doc_start = jnp.where(reset_start >= 0, reset_start, first)
    pos_tok = (t_idx - doc_start) % block_size  # position in its block, before the token
    blk_start = t_idx - pos_tok
    chunk_start = (t_idx // c_len) * c_len
    group = jnp.full((bsz, t_len), _KEEP)  # the memory each token takes its gradient at
    if track_mid:
        group = jnp.where(blk_start > chunk_start, _MID, group)
    if reset is not None:
        group = jnp.where(reset_start >= chunk_start, _MEM0, group)
    group = group.reshape(bsz, n, c_len)

    # Block start after each grid block: that of its last real token, or M_end if it filled it.
    vb = valid.reshape(bsz, n, c_len)
    last = jnp.max(jnp.where(vb, jnp.arange(c_len), -1), axis=-1)  # [B, N]
    lastc = jnp.maximum(last, 0)[..., None]
    last_group = jnp.take_along_axis(group, lastc, axis=-1)[..., 0]
    last_fills = jnp.take_along_axis(pos_tok.reshape(bsz, n, c_len), lastc, -1)[..., 0] == (
        block_size - 1)
    code = jnp.where(last < 0, _KEEP, jnp.where(last_fills, _END, last_group))  # [B, N]

    if track_mid:  # the carried block ends at offset e = C - 1 - pos at the grid block's start
        e_idx = c_len - 1 - pos_tok.reshape(bsz, n, c_len)[..., 0]  # [B, N]
        co["a0_mid"], co["c_mid"], co["d_mid"] = _row(a0, e_idx), _row(co["c"], e_idx), _row(
            dmat, e_idx)
        if inj is not None:
            co["w_mid"] = _row(co["w"], e_idx)

    t_last = jnp.max(jnp.where(valid, t_idx, -1), axis=1)  # [B]
    pos_last = jnp.take_along_axis(pos_tok, jnp.maximum(t_last, 0)[:, None], axis=1)[:, 0]
    pos_final = jnp.where(t_last < 0, pos0, (pos_last + 1) % block_size)
    return co, group, code, pos_final.astype(jnp.int32)


def _block(carry, chunk, *, mem0, act, has_reset, track_mid):
    """One grid block of C tokens: (M, S, R) -> (M, S, R) and y [B, H, C, Dv].

    chunk: q, k [B, H, C, Dk]; v [B, H, C, Dv]; valid [B, C]; group [B, C]; code [B];
    coefficients (``_plan``) for this block; (x0, e0) the gradient factors at memory0.
    """
    mem, mom, ref = carry
    q, k, v, valid, group, code, co, g0 = chunk
    n_layers = len(mem)
    if not track_mid:
        ref = mem  # fresh state, no packing: every grid block starts a gradient block

    xs, es = _token_grads(ref, k, v, act)  # gradients at the carried block start
    if has_reset:  # documents starting inside this block: gradients at memory0
        use0 = group == _MEM0
        xs = [_select(use0, a, b) for a, b in zip(g0[0], xs)]
        es = [_select(use0, a, b) for a, b in zip(g0[1], es)]
    m_mid = None
    if track_mid:  # the same document's next gradient block starts inside this grid block
        m_mid = _memory_at(co["a0_mid"], co["c_mid"], co.get("w_mid"), co["d_mid"], mem, mom,
                           mem0, xs, es)
        xm, em = _token_grads(m_mid, k, v, act)
        use_mid = group == _MID
        xs = [_select(use_mid, a, b) for a, b in zip(xm, xs)]
        es = [_select(use_mid, a, b) for a, b in zip(em, es)]

    # Outputs y_t = M_t(q_t), layer by layer, without forming M_t.
    a0, cv, wv, dm = co["a0"], co["c"], co.get("w"), co["d"]
    h = q  # [B, H, C, Dk]
    for l in range(n_layers):
        z = (a0[..., None] * jnp.einsum("bhci,bhio->bhco", h, mem[l])
             + cv[..., None] * jnp.einsum("bhci,bhio->bhco", h, mom[l]))
        if wv is not None:
            m0l = jnp.broadcast_to(mem0[l], mem[l].shape)
            z = z + wv[..., None] * jnp.einsum("bhci,bhio->bhco", h, m0l)
        scores = jnp.einsum("bhti,bhsi->bhts", h, xs[l]) * dm  # [B, H, C, C]
        z = z - jnp.einsum("bhts,bhso->bhto", scores, es[l])  # [B, H, C, d_{l+1}]
        h = act(z) if l < n_layers - 1 else z
    y = jnp.where(valid[:, None, :, None], h, 0.0)  # [B, H, C, Dv]

    m_end = _memory_at(co["a0_end"], co["c_end"], co.get("w_end"), co["d_end"], mem, mom, mem0,
                       xs, es)
    s_end = tuple(co["p0_end"][..., None, None] * mom[l] - _outer_sum(xs[l], es[l], co["dp_end"])
                  for l in range(n_layers))

    def pick(which, a, b):
        return tuple(jnp.where((code == which)[:, None, None, None], x, y_) for x, y_ in zip(a, b))

    ref_end = pick(_END, m_end, ref)
    if track_mid:
        ref_end = pick(_MID, m_mid, ref_end)
    if has_reset:
        ref_end = pick(_MEM0, tuple(jnp.broadcast_to(m, r.shape) for m, r in zip(mem0, ref)),
                       ref_end)
    return (m_end, s_end, ref_end), y


def titans_chunked(q, k, v, theta, eta, alpha, memory0, state0: TitansState, valid=None,
                   reset=None, *, block_size: int, act) -> tuple[jax.Array, TitansState]:
    """Block-parallel Titans memory; same arguments and results as ``titans_reference``.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; theta, eta, alpha [B, T, H]; memory0 L x [B|1, H, d, d']
    f32; state0.pos None means "fresh state, pos = 0" (no in-block boundary to track).
    valid, reset [B, T] bool or None. Returns (y [B, T, H, Dv] f32, final TitansState).
    """
    bsz, t_len, heads = q.shape[:3]
    c_len = int(block_size)
    has_reset = reset is not None
    track_mid = has_reset or state0.pos is not None
    pos0 = jnp.zeros((bsz,), jnp.int32) if state0.pos is None else state0.pos.astype(jnp.int32)
    n = -(-t_len // c_len)
    t_pad = n * c_len
    valid = jnp.ones((bsz, t_len), bool) if valid is None else valid
    valid = pad_axis(valid, 1, c_len, value=False)  # [B, N*C]
    reset = pad_axis(reset, 1, c_len, value=False) if has_reset else None

    def heads_major(x):  # [B, T, H, ...] -> [B, H, N*C, ...] float32
        return jnp.moveaxis(pad_axis(x.astype(jnp.float32), 1, c_len), 2, 1)

    def grid(x):  # [B, H, N*C, ...] -> [N, B, H, C, ...]
        x = x.reshape(x.shape[:2] + (n, c_len) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    q, k, v, theta, eta, alpha = (heads_major(x) for x in (q, k, v, theta, eta, alpha))
    gates = (x.reshape(bsz, heads, n, c_len) for x in (theta, eta, alpha))
    co, group, code, pos_final = _plan(*gates, valid, reset, pos0, c_len, track_mid)
    co = {name: jnp.moveaxis(x, 2, 0) for name, x in co.items()}  # [N, B, H, ...]
    g0 = None
    if has_reset:  # gradient factors at memory0 for every token, outside the sequential scan
        x0, e0 = _token_grads(memory0, k, v, act)  # L x [B, H, N*C, d]
        g0 = (tuple(grid(x) for x in x0), tuple(grid(e) for e in e0))
    xs = (grid(q), grid(k), grid(v), jnp.moveaxis(valid.reshape(bsz, n, c_len), 1, 0),
          jnp.moveaxis(group, 1, 0), jnp.moveaxis(code, 1, 0), co, g0)
    carry0 = (tuple(state0.memory), tuple(state0.momentum), tuple(state0.block_start))

    def body(carry, chunk):
        return _block(carry, chunk, mem0=tuple(memory0), act=act, has_reset=has_reset,
                      track_mid=track_mid)

    (mem, mom, ref), ys = jax.lax.scan(jax.checkpoint(body), carry0, xs)  # ys [N, B, H, C, Dv]
    y = jnp.moveaxis(ys, 0, 2).reshape(bsz, heads, t_pad, ys.shape[-1])[:, :, :t_len]
    return jnp.moveaxis(y, 1, 2), TitansState(mem, mom, ref, pos_final)


class LinearFactors(NamedTuple):
    """Per-block factors of the linear-memory recurrence for the Pallas kernels, [B, H, N, C, ·]
    (scalars per block [B, H, N]); features zero-padded. With E = 2(K M − V) at the block start:

        Y = qa M + qc S − pm E;   M' = a0e M + ce S − kdᵀ E;   S' = p0e S − kpᵀ E
    """
    qa: jax.Array    # a0_t q_t
    qc: jax.Array    # c_t q_t
    k: jax.Array
    v: jax.Array
    pm: jax.Array    # (q_t · k_s) D[t, s]                                  [.., C, C]
    kd: jax.Array    # D[C-1, s] k_s
    kp: jax.Array    # P[C-1, s] θ_s k_s
    a0e: jax.Array   # [B, H, N]
    ce: jax.Array
    p0e: jax.Array


def linear_kernel_factors(q, k, v, theta, eta, alpha, *, block_size: int, k_size: int,
                          v_size: int) -> tuple[LinearFactors, jax.Array, jax.Array]:
    """XLA half of the linear-memory kernels (no packing, fresh state: grid block = gradient
    block). q, k [B, T, H, Dk]; v [B, T, H, Dv]; gates [B, T, H]. Returns (factors, code [B, N]
    (``_END`` where a grid block fills its gradient block), final pos [B])."""
    bsz, t_len, heads, _ = q.shape
    c_len = int(block_size)
    n = -(-t_len // c_len)
    valid = pad_axis(jnp.ones((bsz, t_len), bool), 1, c_len, value=False)  # [B, N*C]

    def blocks(x, size=None):  # [B, T, H, D?] -> [B, H, N, C, D?] float32, features padded
        x = pad_axis(x.astype(jnp.float32), 1, c_len)
        if size is not None and size != x.shape[-1]:
            x = pad_axis(x, x.ndim - 1, size)
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(x.shape[:2] + (n, c_len) + x.shape[3:])

    q, k = blocks(q, k_size), blocks(k, k_size)
    v = blocks(v, v_size)
    gates = (blocks(x) for x in (theta, eta, alpha))
    pos0 = jnp.zeros((bsz,), jnp.int32)
    co, _, code, pos_final = _plan(*gates, valid, None, pos0, c_len, False)
    scores = jnp.einsum("bhnti,bhnsi->bhnts", q, k)  # [B, H, N, C, C]
    f = LinearFactors(qa=co["a0"][..., None] * q, qc=co["c"][..., None] * q, k=k, v=v,
                      pm=scores * co["d"], kd=co["d_end"][..., None] * k,
                      kp=co["dp_end"][..., None] * k, a0e=co["a0_end"], ce=co["c_end"],
                      p0e=co["p0_end"])
    return f, code, pos_final


def run_linear_kernels(q, k, v, theta, eta, alpha, state0: TitansState, *, block_size: int,
                       k_size: int, v_size: int, recurrence) -> tuple[jax.Array, TitansState]:
    """The shared frame of the linear-memory Pallas paths: factors in XLA, then
    ``recurrence(factors, m0, s0)`` -> (y [B, H, N, C, Vp], M, S, M entering the last block
    [B, H, Kp, Vp]), then unpadding and the final state (block_start = the memory the last,
    unfinished gradient block began with, or the end memory when the blocks are full).
    Returns (y [B, T, H, Dv] float32, final TitansState)."""
    t_len, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
    f, code, pos = linear_kernel_factors(q, k, v, theta, eta, alpha, block_size=block_size,
                                         k_size=k_size, v_size=v_size)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, k_size - dk), (0, v_size - dv)))
    y, m, s, m_last = recurrence(f, pad(state0.memory[0]), pad(state0.momentum[0]))
    m, s, m_last = (x[:, :, :dk, :dv] for x in (m, s, m_last))
    block_start = jnp.where((code[:, -1] == _END)[:, None, None, None], m, m_last)
    y = y.reshape(y.shape[:2] + (-1, v_size))[:, :, :t_len, :dv]  # [B, H, T, Dv]
    return jnp.moveaxis(y, 1, 2), TitansState((m,), (s,), (block_start,), pos)
