"""KDA, chunkwise parallel in pure JAX (the CPU default): the WY/UT form with per-channel decay.

Split time into chunks of C tokens. Inside a chunk (positions i, j = 0..C-1) let
G_i = Σ_{m<=i} g_m [K] be the cumulative log decay per key channel and S_0 [K, V] the state
entering the chunk. Unrolling ``reference.py``, the delta-rule new values
δ_j = β_j (v_j − S'_jᵀ k_j) satisfy

    δ_i + Σ_{j<i} A_ij δ_j = β_i v_i − β_i (e^{G_i} ⊙ k_i)ᵀ S_0,
    A_ij = β_i Σ_k k_ik k_jk e^{G_ik − G_jk}                       (j < i),

so with T = (I + A)^{-1} (a unit lower-triangular inverse, ``common.triangular``):

    w = T (β ⊙ e^{G} ⊙ k)  [C, K],   u = T (β v)  [C, V],   δ = u − w S_0,
    o_i = scale ((e^{G_i} ⊙ q_i)ᵀ S_0 + Σ_{j<=i} P_ij δ_j),  P_ij = Σ_k q_ik k_jk e^{G_ik − G_jk},
    S_C = Diag(e^{G_last}) S_0 + Σ_j (e^{G_last − G_j} ⊙ k_j) δ_jᵀ.

Every exponent is <= 0 for valid gates: e^{G_i} and e^{G_last − G_j} are factored against the
chunk start and end, and A, P (a sum over channels of e^{G_ik − G_jk}, which no single matmul
of e^{G} and e^{−G} can form once the decay reaches −100 in a chunk) come from
``common.decay.decayed_scores``, which factors off-diagonal sub-chunk blocks around a reference
row and takes the diagonal blocks pairwise.

Blocks of chunks (CPU): the sequence runs as a ``fori_loop`` over blocks of nb chunks (about
``BLOCK_ROWS`` token×head rows, so a block's C×C and C×K factors stay in cache). A block slices
the [B, T, H, D] inputs in place, builds its factors batched over its chunks, runs the chunk
recurrence δ = u − w S; S <- Diag(λ) S + kgᵀ δ in a ``lax.scan`` and writes its outputs back.
Backward (``custom_vjp``): the forward keeps one state per block; the backward walks the blocks
in reverse, recomputes each block with ``jax.vjp`` (which holds one state per chunk of that
block only) and pulls the output cotangent and dS back through it. Memory is O(T·D) plus one
state per block, never one state per token. Autodiff through ``decayed_scores`` was ~4x its
forward, so A0 and P get a hand-written VJP (:func:`_scores`): for A = decayed_scores(a, b, G)
and a cotangent m, da_i = Σ_j m_ij b_j ⊙ e^{G_i − G_j}, db_j = Σ_i m_ij a_i ⊙ e^{G_i − G_j}
(built from the same stable factors, computed once for both scores) and dG = a ⊙ da − b ⊙ db.

Documents packed with ``segment_ids`` are exact as in ``gated_delta/chunked.py``: with n_i the
document number of token i, A and P keep only n_i == n_j, a token reads (and its w row corrects
for) the incoming state only if no reset happened in the chunk up to it (``carry``), and the
outgoing state keeps only tokens of the chunk's last document (``tail``) and drops S_0 if the
chunk contains a reset. Differences G_i − G_j within one document are unaffected by decays of
earlier documents in the chunk, so no rescaling is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import expand_groups, pad_axis, segment_masks
from pallas_kernels.common.decay import decayed_scores
from pallas_kernels.common.triangular import unit_lower_inverse
from pallas_kernels.gated_delta.chunked import doc_carry, from_chunks, to_chunks
from pallas_kernels.gated_delta.reference import l2norm

__all__ = ["DEFAULT_CHUNK", "SUB_CHUNK", "BLOCK_ROWS", "canonicalize", "kda_chunked"]

# CPU tuning (fwd+bwd, B1 H4 K=V=64, one core): C = 16 with sub-chunks of 8 and blocks of 512
# token×head rows measured 17k tokens/s, vs 12k for C = 32 and 8k for unsplit 16-token sub-chunks.
DEFAULT_CHUNK = 16
SUB_CHUNK = 8               # decayed_scores' sub-chunk: diagonal blocks taken pairwise
BLOCK_ROWS = 512            # token × head rows per block of chunks (keeps a block in cache)
_HI = lax.Precision.HIGHEST


def canonicalize(q, k, v, g, beta, *, segment_ids, use_qk_l2norm, chunk):
    """Float32, l2norm, grouped heads expanded, padding as no-ops, T padded to a multiple of C.

    Padding tokens (segment id 0) get g = 0, β = 0: they neither decay nor write, so the state
    passes through them unchanged (their outputs are masked by the caller). Returns
    (q, k, g [B, Tp, HV, K], v [B, Tp, HV, V], beta [B, Tp, HV], docs [B, Tp] int32 | None,
    valid [B, T] | None); ``docs`` numbers the documents of each row (+1 at every reset).
    """
    HV = v.shape[2]
    f32 = jnp.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_groups(q.astype(f32), HV)
    k = expand_groups(k.astype(f32), HV)
    v, g, beta = v.astype(f32), g.astype(f32), beta.astype(f32)
    docs = valid = None
    if segment_ids is not None:
        valid, reset = segment_masks(segment_ids)                        # [B, T]
        g = jnp.where(valid[:, :, None, None], g, 0.0)
        beta = jnp.where(valid[:, :, None], beta, 0.0)
        docs = jnp.cumsum(reset.astype(jnp.int32), axis=1)               # [B, T]
        docs = jnp.pad(docs, ((0, 0), (0, (-docs.shape[1]) % chunk)), mode="edge")
    q, k, v, g, beta = (pad_axis(x, 1, chunk) for x in (q, k, v, g, beta))
    return q, k, v, g, beta, docs, valid


def _dot(spec, x, y):
    return jnp.einsum(spec, x, y, precision=_HI)


# --------------------------------------------------------------------------- decayed scores
def _sub_block(C, sub_chunk):
    """The largest divisor of C that is <= sub_chunk."""
    return max(d for d in range(1, min(C, sub_chunk) + 1) if C % d == 0)


def _decay_factors(G, s):
    """The exp factors of the stable construction, all exponents <= 0 (``common.decay``).

    G [..., C, K] -> (fa [..., n, s, K] = e^{G_i − G_r(p)} for row i of sub-chunk p (r its first
    row), fb [..., n, C, K] = e^{G_r(p) − G_j} for columns j < r(p) (0 elsewhere),
    e [..., n, s, s, K] = e^{G_i − G_j} inside sub-chunk p for j <= i (0 elsewhere)).
    """
    *lead, C, K = G.shape
    n = C // s
    Gs = G.reshape(*lead, n, s, K)
    Gr = Gs[..., :, :1, :]                                               # [..., n, 1, K]
    fa = jnp.exp(Gs - Gr)
    earlier = (jnp.arange(C)[None, :] < (jnp.arange(n) * s)[:, None])[:, :, None]   # [n, C, 1]
    fb = jnp.exp(jnp.where(earlier, Gr - G[..., None, :, :], -jnp.inf))
    tri = (jnp.arange(s)[None, :] <= jnp.arange(s)[:, None])[:, :, None]         # [s, s, 1]
    e = jnp.exp(jnp.where(tri, Gs[..., :, :, None, :] - Gs[..., :, None, :, :], -jnp.inf))
    return fa, fb, e


def _row_apply(m, b, factors, s):
    """Y_i = Σ_{j<=i} m_ij b_j ⊙ e^{G_i − G_j}: m [..., C, C] (lower), b [..., C, K] -> [..., C, K]
    (leading dims broadcast). ∂/∂a of Σ_ij m_ij A_ij for A = decayed_scores(a, b, G)."""
    fa, fb, e = factors
    C, K = b.shape[-2:]
    n = C // s
    mr = m.reshape(*m.shape[:-2], n, s, C)                               # rows by sub-chunk
    off = fa * _dot("...pij,...pjk->...pik", mr, b[..., None, :, :] * fb)
    md = _diag(mr, s)                                                    # [..., n, s, s]
    diag = jnp.sum(md[..., None] * b.reshape(*b.shape[:-2], n, 1, s, K) * e, axis=-2)
    return (off + diag).reshape(*off.shape[:-3], C, K)


def _col_apply(m, a, factors, s):
    """Z_j = Σ_{i>=j} m_ij a_i ⊙ e^{G_i − G_j}: m [..., C, C] (lower), a [..., C, K] -> [..., C, K]
    (leading dims broadcast). ∂/∂b of Σ_ij m_ij A_ij for A = decayed_scores(a, b, G)."""
    fa, fb, e = factors
    C, K = a.shape[-2:]
    n = C // s
    mr = m.reshape(*m.shape[:-2], n, s, C)
    af = a.reshape(*a.shape[:-2], n, s, K) * fa
    off = jnp.sum(fb * _dot("...pij,...pik->...pjk", mr, af), axis=-3)   # [..., C, K]
    md = _diag(mr, s)
    diag = jnp.sum(md[..., None] * a.reshape(*a.shape[:-2], n, s, 1, K) * e, axis=-3)
    return off + diag.reshape(*diag.shape[:-3], C, K)


def _diag(mr, s):
    """[..., n, s, C] rows by sub-chunk -> [..., n, s, s] the diagonal s×s blocks."""
    n = mr.shape[-3]
    blocks = mr.reshape(*mr.shape[:-1], n, s)                            # [..., n, s, n, s]
    return _dot("...piqj,pq->...pij", blocks, jnp.eye(n, dtype=mr.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scores(q, k, G, sub_chunk):
    """(A0, P): A0_ij = Σ_c k_ic k_jc e^{G_ic − G_jc} (j < i), P_ij = Σ_c q_ic k_jc e^{G_ic − G_jc}
    (j <= i), both [..., C, C], from ``decayed_scores``; the VJP below reuses one set of exp
    factors (:func:`_decay_factors`) for both and takes the sums over the middle axis."""
    return _scores_fwd(q, k, G, sub_chunk)[0]


def _scores_fwd(q, k, G, sub_chunk):
    s = _sub_block(G.shape[-2], sub_chunk)
    a = decayed_scores(k, k, G, sub_chunk=s, strict=True)
    p = decayed_scores(q, k, G, sub_chunk=s)
    return (a, p), (q, k, G)


def _scores_bwd(sub_chunk, res, cts):
    """For A = decayed_scores(a, b, G) and a cotangent m: da = row_apply(m, b),
    db = col_apply(m, a), dG = a ⊙ da − b ⊙ db (∂A_ij/∂G_ic = ±a_ic b_jc e^{G_ic − G_jc})."""
    q, k, G = res
    da0, dp = cts
    C = G.shape[-2]
    s = _sub_block(C, sub_chunk)
    incl = jnp.tril(jnp.ones((C, C), jnp.float32))
    ma, mp = da0 * (incl - jnp.eye(C, dtype=jnp.float32)), dp * incl     # structural zeros
    f = _decay_factors(G, s)                                             # shared by A0 and P
    ra = _row_apply(ma, k, f, s)                                         # ∂/∂k (rows of A0)
    rp = _row_apply(mp, k, f, s)                                         # ∂/∂q
    ca = _col_apply(ma, k, f, s)                                         # ∂/∂k (columns of A0)
    cp = _col_apply(mp, q, f, s)                                         # ∂/∂k (columns of P)
    dG = k * (ra - ca - cp) + q * rp
    return rp, ra + ca + cp, dG


_scores.defvjp(_scores_fwd, _scores_bwd)


# --------------------------------------------------------------------------- one block of chunks
def _block_inputs(xs, i, chunk, nb):
    """Block i (nb chunks) of the [B, Tp, ...] inputs in the chunk layout [nb, B, HV, C, ...];
    docs and carry as [nb, B, 1, C]."""
    q, k, v, g, beta, docs, carry = xs
    L = chunk * nb
    cut = lambda x: lax.dynamic_slice_in_dim(x, i * L, L, axis=1)
    tm = functools.partial(to_chunks, chunk=chunk, time_major=True)
    out = [tm(cut(x)) for x in (q, k, v, g, beta)]
    if docs is None:
        return tuple(out), (None, None)
    B = docs.shape[0]
    doc_layout = lambda x: jnp.transpose(cut(x).reshape(B, nb, chunk), (1, 0, 2))[:, :, None]
    return tuple(out), (doc_layout(docs), doc_layout(carry))


def _block(arrays, s0, docs, carry, scale, sub_chunk):
    """Outputs and final state of one block: arrays = (q, k, v, g, beta) [nb, B, HV, C, ...],
    s0 [B, HV, K, V]. Returns (o [nb, B, HV, C, V], S after the block). Differentiable."""
    q, k, v, g, beta = arrays
    C = g.shape[-2]
    incl = jnp.tril(jnp.ones((C, C), jnp.float32))
    # cumsum as a matmul with a triangle of ones (XLA:CPU's cumsum is ~10x slower)
    G = _dot("ij,...jk->...ik", incl, g)                                 # [nb, B, HV, C, K]
    G_last = G[..., -1:, :]                                              # [nb, B, HV, 1, K]
    gamma = jnp.exp(G)                                                   # e^{G_i} <= 1
    gamma_o = jnp.exp(G_last - G)                                        # e^{G_last − G_j} <= 1
    lam = jnp.exp(G_last[..., 0, :])                                     # [nb, B, HV, K]
    a, p = _scores(q, k, G, sub_chunk)                                   # [nb, B, HV, C, C]
    if docs is not None:
        same = (docs[..., :, None] == docs[..., None, :]).astype(jnp.float32)
        a, p = a * same, p * same
        gamma = gamma * carry[..., None]
        gamma_o = gamma_o * (docs == docs[..., -1:]).astype(jnp.float32)[..., None]   # tail
        lam = lam * carry[..., -1:]
    t = unit_lower_inverse(beta[..., :, None] * a)                       # (I + A)^{-1}
    w = _dot("...ij,...jk->...ik", t, (beta[..., None] * gamma) * k)     # [nb, B, HV, C, K]
    u = _dot("...ij,...jv->...iv", t, beta[..., None] * v)               # [nb, B, HV, C, V]
    kg = gamma_o * k
    qg = scale * gamma * q

    def step(state, xs):
        w_c, u_c, kg_c, lam_c = xs
        delta = u_c - _dot("bhck,bhkv->bhcv", w_c, state)
        new = lam_c[..., None] * state + _dot("bhck,bhcv->bhkv", kg_c, delta)
        return new, (delta, state)

    final, (delta, states) = lax.scan(step, s0, (w, u, kg, lam))
    o = _dot("nbhck,nbhkv->nbhcv", qg, states) + scale * _dot("nbhij,nbhjv->nbhiv", p, delta)
    return o, final


# --------------------------------------------------------------------------- blocks of chunks
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _blocked(q, k, v, g, beta, docs, carry, s0, scale, chunk, nb, sub_chunk):
    """o [B, Tp, HV, V] and the final state over Tp / (chunk·nb) blocks (inputs [B, Tp, ...])."""
    return _blocked_fwd(q, k, v, g, beta, docs, carry, s0, scale, chunk, nb, sub_chunk)[0]


def _blocked_fwd(q, k, v, g, beta, docs, carry, s0, scale, chunk, nb, sub_chunk):
    xs = (q, k, v, g, beta, docs, carry)
    B, Tp, HV, V = v.shape
    n_blocks = Tp // (chunk * nb)

    def body(i, state):
        o_buf, s, s_buf = state
        arrays, (dc, cr) = _block_inputs(xs, i, chunk, nb)
        ob, s_next = _block(arrays, s, dc, cr, scale, sub_chunk)
        ob = from_chunks(ob, time_major=True)                            # [B, L, HV, V]
        o_buf = lax.dynamic_update_slice_in_dim(o_buf, ob, i * chunk * nb, axis=1)
        return o_buf, s_next, s_buf.at[i].set(s)

    init = (jnp.zeros((B, Tp, HV, V), jnp.float32), s0,
            jnp.zeros((n_blocks,) + s0.shape, jnp.float32))
    o, final, s_buf = lax.fori_loop(0, n_blocks, body, init)
    return (o, final), (xs, s_buf)


def _from_chunks_any(x):
    """[nb, B, H, C, *D] -> [B, nb·C, H, *D]."""
    nb, B, H, C = x.shape[:4]
    x = jnp.moveaxis(x, (0, 1, 2, 3), (1, 0, 3, 2))                      # [B, nb, C, H, ...]
    return x.reshape(B, nb * C, H, *x.shape[4:])


def _blocked_bwd(scale, chunk, nb, sub_chunk, res, cts):
    xs, s_buf = res
    do, d_final = cts
    L = chunk * nb

    def body(j, state):
        i = s_buf.shape[0] - 1 - j
        ds, grads = state
        arrays, (dc, cr) = _block_inputs(xs, i, chunk, nb)
        fn = lambda a, s: _block(a, s, dc, cr, scale, sub_chunk)
        _, pull = jax.vjp(fn, arrays, s_buf[i])
        dob = to_chunks(lax.dynamic_slice_in_dim(do, i * L, L, axis=1), chunk, True)
        d_arrays, ds = pull((dob, ds))
        put = lambda buf, d: lax.dynamic_update_slice_in_dim(buf, _from_chunks_any(d), i * L,
                                                             axis=1)
        return ds, tuple(put(b, d) for b, d in zip(grads, d_arrays))

    zeros = tuple(jnp.zeros_like(x) for x in xs[:5])
    ds0, grads = lax.fori_loop(0, s_buf.shape[0], body, (d_final, zeros))
    return (*grads, None, None, ds0)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _blocking(n_chunks, rows_per_chunk, target_rows):
    """nb: chunks per block so that NB blocks of nb chunks cover n_chunks with
    nb·rows_per_chunk ≈ target_rows."""
    nb = max(1, min(n_chunks, target_rows // max(1, rows_per_chunk)))
    n_blocks = -(-n_chunks // nb)
    return -(-n_chunks // n_blocks)


def kda_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                use_qk_l2norm=False, segment_ids=None, chunk_size=DEFAULT_CHUNK,
                sub_chunk=SUB_CHUNK, block_rows=None):
    """Chunked KDA. Shapes as in ``reference.py``; returns (o in v.dtype, final state | None).

    ``block_rows`` (default ``BLOCK_ROWS``) sets how many token×head rows one block of chunks
    holds; ``sub_chunk`` is decayed_scores' diagonal block (module docstring).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    C = int(chunk_size)
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    nb = _blocking(-(-T // C), B * HV * C, block_rows)
    q, k, vf, g, beta, docs, valid = canonicalize(q, k, v, g, beta, segment_ids=segment_ids,
                                                  use_qk_l2norm=use_qk_l2norm, chunk=C * nb)
    carry = None if docs is None else doc_carry(docs, C)
    s0 = (jnp.zeros((B, HV, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    o, final = _blocked(q, k, vf, g, beta, docs, carry, s0, float(scale), C, nb, int(sub_chunk))
    o = o[:, :T]                                                         # [B, T, HV, V]
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, 0.0)
    return o.astype(v.dtype), (final if output_final_state else None)
