"""Titans linear memory on GPU: Triton kernels (``triton_kernels.py``) through jax_triton.

For a linear memory (``{"w": [H, Dk, Dv]}``) with no packing and a fresh state, every block of
C = b tokens is one gradient block whose tokens take their gradients at the memory M the block
starts with: E = 2(k M − v) (rows e_s = 2(Mᵀk_s − v_s), G_s = k_s e_sᵀ). XLA builds the
per-block factors (``chunked.linear_kernel_factors``: the coefficients of ``chunked._plan``
folded into the operands; cast here to the input dtype, the three per-block scalars float32):

    forward, block c:   E = 2(k M − v);   y = qa M + qc S − pm E
                        M <- a0e M + ce S − kdᵀ E;   S <- p0e S − kpᵀ E
    backward, c = N-1 .. 0, (dM, dS) = ∂L/∂(M, S) leaving block c, (M, S) entering it:
        dE = −pmᵀ dy − kd dM − kp dS;   dv = −2 dE
        dM <- qaᵀ dy + a0e dM + 2 kᵀ dE;   dS <- qcᵀ dy + ce dM + p0e dS
        dqa = dy Mᵀ;  dqc = dy Sᵀ;  dpm = −dy Eᵀ;  dkd = −E dMᵀ;  dkp = −E dSᵀ;  dk = 2 dE Mᵀ
        da0e = Σ M ⊙ dM;   dce = Σ S ⊙ dM;   dp0e = Σ S ⊙ dS

**What is parallel over blocks.** E needs the memory the block starts with, and that memory
needs the previous block's E: the state recurrence is sequential (as GDN's, whose v_new plays
E's part). Value columns are independent in it (E, M, S column j depend on column j only), key
rows are not (E sums over them), so the recurrence kernels tile V and hold all K rows. Given the
per-block states everything else is block-parallel: the outputs y, and every backward product.
The reverse recurrence needs no forward state at all (dE depends on dM, dS and dy only), so:

1. ``titans_fwd_h`` (grid V/BV × BH, loop over blocks): stores M, S entering each block (input
   dtype) and E; returns M, S and M entering the last block (float32: the state's
   ``block_start`` when T is not a multiple of b; its cotangent joins dM there).
2. ``titans_fwd_o`` (grid V/BV × N × BH): y.
3. ``titans_bwd_dh`` (grid V/BV × BH, reverse loop): stores dM, dS leaving each block, writes
   dv; returns the cotangents of the initial (M, S).
4. ``titans_bwd_dk`` (grid N × BH): per block the products above, each reduction over V (and
   the scalars' over K × V) owned by one program, looping over (K, V) tiles.

Rows of E (and dE) are independent given the block's state, so the recurrence kernels take a
block CS = 16 rows at a time (an inner loop accumulating the state updates): their [CS, K]
operands stay small in registers and shared memory for any b and K up to 256. The forward's
residuals are its inputs, the per-block (M, S) and E. Blocks: Triton's
``tl.dot`` takes power-of-two tiles of at least 16, so b is a power of two in 16..64
(``supports``; 64 bounds the [b, K] operands of the recurrence kernels in shared memory); K and
V are zero-padded to powers of two >= 16, up to 256 (``TABLE``). Dots: input-dtype operands
(bf16, or fp32 as TF32 on a GPU), float32 accumulation; carried states float32.

**Resources.** The table's gate case runs b = 64 (the largest shared memory and accumulators):
every kernel passes the compile gate there on sm_80 / sm_90a / sm_100a. At b = 16, compiled by
hand: on sm_90a ``fwd_o`` and ``bwd_dk`` use mma.sync, not wgmma (their dots have b = 16 rows,
under wgmma's 64; at b = 16 both are memory-bound: ~b flops per byte of state read), and float32
K = 256 ``bwd_dh`` spills (232 B on sm_80, 128 B on sm_90a).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import triton_call
from pallas_kernels.common.triton_support import KernelTable, dtype_name, padded
from pallas_kernels.titans.chunked import run_linear_kernels
from pallas_kernels.titans.reference import TitansState

__all__ = ["supports", "BLOCK_RULE", "TABLE", "recurrence", "titans_linear_triton",
           "KERNEL_NAMES"]

MIN_BLOCK, MAX_BLOCK = 16, 64
BLOCK_RULE = f"a power of two in {MIN_BLOCK}..{MAX_BLOCK}"
KERNEL_NAMES = ("titans_fwd_h", "titans_fwd_o", "titans_bwd_dh", "titans_bwd_dk")


def supports(block_size: int) -> bool:
    """Whether the gradient block size is ``BLOCK_RULE``."""
    return MIN_BLOCK <= block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0


# --------------------------------------------------------------------------- tiles per config
def _tiles(dtype, K: int, V: int) -> dict:
    """Tile sizes and launch options per kernel for padded (K, V) and the operand dtype.

    The recurrence kernels ("h": fwd_h and bwd_dh) hold 2 × [K, BV] float32 states in registers
    (2·K·BV / (32·warps) registers per thread: BV shrinks as K grows) and take a block CS rows
    at a time, so their [CS, K] operands stay small. The parallel kernels keep [b, BK]
    accumulators (five in bwd_dk) and stream [BK, BV] state tiles (``num_stages`` deep)."""
    f32 = jnp.dtype(dtype) == jnp.float32
    h = dict(BV=min(V, 16 if K > 128 else 32), CS=16, num_warps=8, num_stages=1)
    o = dict(BK=min(K, 64), BV=min(V, 32 if f32 else 64), num_warps=4,
             num_stages=1 if K <= 64 else 2)          # one key tile: nothing to pipeline
    dk = dict(BK=min(K, 32), BV=min(V, 16 if f32 else 32), num_warps=8, num_stages=2)
    return {"h": h, "o": o, "dk": dk}


def _launch(name, *args, out_shape, grid, interpret, cfg, **constexprs):
    from pallas_kernels.titans import triton_kernels
    opts = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    sizes = {k: v for k, v in cfg.items() if k not in opts}
    return triton_call.launch(getattr(triton_kernels, name), *args, out_shape=out_shape,
                              grid=grid, interpret=interpret, name=name, **opts, **sizes,
                              **constexprs)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# --------------------------------------------------------------------------- forward / backward
def _forward(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, *, chunk, interpret):
    """qa, qc, k, kd, kp [BH, T, K]; v [BH, T, V]; pm [BH, T, C] (input dtype); a0e, ce, p0e
    [BH, N]; m0, s0 [BH, K, V] float32. Returns (y [BH, T, V], M, S, M entering block N-1
    [BH, K, V] float32) and the residual (ms, ss [BH, N, K, V], e [BH, T, V])."""
    BH, T, K = qa.shape
    V, N, dt = v.shape[-1], T // chunk, qa.dtype
    cfg = _tiles(dt, K, V)
    size = dict(T=T, N=N, C=chunk, K=K, V=V)
    f32 = jnp.float32
    ms, ss, e, mf, sf, ml = _launch(
        "titans_fwd_h", k, v, kd, kp, a0e, ce, p0e, m0, s0,
        out_shape=[_sds((BH, N, K, V), dt)] * 2 + [_sds((BH, T, V), dt)]
        + [_sds((BH, K, V), f32)] * 3,
        grid=(V // cfg["h"]["BV"], BH), interpret=interpret, cfg=cfg["h"], **size)
    (y,) = _launch("titans_fwd_o", qa, qc, pm, ms, ss, e, out_shape=[_sds((BH, T, V), dt)],
                   grid=(V // cfg["o"]["BV"], N, BH), interpret=interpret, cfg=cfg["o"], **size)
    return (y, mf, sf, ml), (ms, ss, e)


def _backward(inputs, res, cts, *, chunk, interpret):
    """Cotangents of (qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0) for those of
    (y, M, S, M entering block N-1)."""
    qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, _, _ = inputs
    ms, ss, e = res
    BH, T, K = qa.shape
    V, N, dt = v.shape[-1], T // chunk, qa.dtype
    f32 = jnp.float32
    dy, dmf, dsf, dml = cts
    dy = dy.astype(dt)
    dmf, dsf, dml = (x.astype(f32) for x in (dmf, dsf, dml))
    cfg = _tiles(dt, K, V)
    size = dict(T=T, N=N, C=chunk, K=K, V=V)
    dms, dss, dv, dm0, ds0 = _launch(
        "titans_bwd_dh", qa, qc, k, kd, kp, pm, dy, a0e, ce, p0e, dmf, dsf, dml,
        out_shape=[_sds((BH, N, K, V), dt)] * 2 + [_sds((BH, T, V), dt)]
        + [_sds((BH, K, V), f32)] * 2,
        grid=(V // cfg["h"]["BV"], BH), interpret=interpret, cfg=cfg["h"], **size)
    dqa, dqc, dkd, dkp, dk, dpm, da0e, dce, dp0e = _launch(
        "titans_bwd_dk", dy, e, dv, ms, ss, dms, dss,
        out_shape=[_sds((BH, T, K), dt)] * 5 + [_sds((BH, T, chunk), dt)]
        + [_sds((BH, N), f32)] * 3,
        grid=(N, BH), interpret=interpret, cfg=cfg["dk"], **size)
    return (dqa, dqc, dk, dv, dpm, dkd, dkp, da0e, dce, dp0e, dm0, ds0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13))
def recurrence(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, chunk, interpret):
    """(y, M, S, M entering the last block) of the block recurrence (shapes: ``_forward``)."""
    return _forward(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, chunk=chunk,
                    interpret=interpret)[0]


def _recurrence_fwd(*args):
    *inputs, chunk, interpret = args
    out, res = _forward(*inputs, chunk=chunk, interpret=interpret)
    return out, (tuple(inputs), res)


def _recurrence_bwd(chunk, interpret, saved, cts):
    inputs, res = saved
    return _backward(inputs, res, cts, chunk=chunk, interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def titans_linear_triton(q, k, v, theta, eta, alpha, state0: TitansState, *, block_size: int,
                         interpret=False) -> tuple[jax.Array, TitansState]:
    """Linear-memory Titans through the Triton kernels: no packing, a fresh state (pos 0).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; gates [B, T, H]; state0 memory/momentum 1 x
    [B, H, Dk, Dv] float32. Returns (y [B, T, H, Dv] in the operand dtype (bf16 for bf16 q,
    else float32), final TitansState float32).
    """
    B, _, H, K = q.shape
    kp, vp = padded(K), padded(v.shape[-1])
    dt = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32

    def run(f, m0, s0):
        n = f.a0e.shape[-1]
        flat = lambda x: x.reshape(B * H, n * block_size, x.shape[-1]).astype(dt)  # [BH, T, D]
        scal = lambda x: x.reshape(B * H, n)
        state = lambda x: x.reshape(B * H, kp, vp)
        out = recurrence(flat(f.qa), flat(f.qc), flat(f.k), flat(f.v), flat(f.pm), flat(f.kd),
                         flat(f.kp), scal(f.a0e), scal(f.ce), scal(f.p0e), state(m0), state(s0),
                         block_size, interpret)
        return tuple(x.reshape((B, H) + x.shape[1:]) for x in out)

    return run_linear_kernels(q, k, v, theta, eta, alpha, state0, block_size=block_size,
                              k_size=kp, v_size=vp, recurrence=run)


# --------------------------------------------------------------------------- the kernel table
def _request(arrays, static):
    q, _, v = arrays[:3]
    return dtype_name(q), {"K": padded(q.shape[-1]), "V": padded(v.shape[-1])}


def _shared_bytes(dtype, sizes) -> int:
    """An upper estimate of the largest kernel's shared memory at b = C = MAX_BLOCK: every dot
    operand of one step staged at once (``num_stages`` copies of the streamed ones).

    bwd_dh: 5 [CS, K] + pm [C, CS] + dy [C, BV] + (dM, dS) [K, BV] + 2 [CS, BV] (fwd_h less);
    fwd_o: stages × (qa, qc [C, BK] + M, S [BK, BV]) + pm [C, C] + E [C, BV];
    bwd_dk: stages × (dy, E, dv [C, BV] + M, S, dM, dS [BK, BV])."""
    K, V, C = sizes["K"], sizes["V"], MAX_BLOCK
    item = jnp.dtype(dtype).itemsize
    t = _tiles(dtype, K, V)
    h, o, dk = t["h"], t["o"], t["dk"]
    cs, bv = h["CS"], h["BV"]
    dh = 5 * cs * K + C * cs + C * bv + 2 * K * bv + 2 * cs * bv
    fo = o["num_stages"] * (2 * C * o["BK"] + 2 * o["BK"] * o["BV"]) + C * C + C * o["BV"]
    bk = dk["num_stages"] * (3 * C * dk["BV"] + 4 * dk["BK"] * dk["BV"])
    return max(dh, fo, bk) * item


def _gate_case(dtype, sizes):
    """value_and_grad of a loss over ``titans(impl="triton")`` with the final state: every
    kernel, b = MAX_BLOCK, B=1, H=2, T=256."""
    from pallas_kernels.titans.ops import titans
    B, T, H, K, V = 1, 256, 2, sizes["K"], sizes["V"]
    dt = jnp.dtype(dtype)

    def loss(q, k, v, theta, eta, alpha, w):
        y, st = titans(q, k, v, theta, eta, alpha, {"w": w}, block_size=MAX_BLOCK,
                       impl="triton", output_final_state=True)
        return (jnp.sum(y.astype(jnp.float32)) + jnp.sum(st["memory"]["w"])
                + jnp.sum(st["momentum"]["w"]) + jnp.sum(st["block_start"]["w"]))

    fn = jax.value_and_grad(loss, argnums=tuple(range(7)))
    args = (_sds((B, T, H, K), dt), _sds((B, T, H, K), dt), _sds((B, T, H, V), dt),
            *[_sds((B, T, H), dt)] * 3, _sds((H, K, V), dt))
    return fn, args


TABLE = KernelTable(op="titans", max_sizes={"K": 256, "V": 256}, request=_request,
                    shared_bytes=_shared_bytes, gate_case=_gate_case,
                    dotless=())
