"""Public Titans neural-memory op: argument checks, state plumbing, implementation choice.

    titans(q, k, v, theta, eta, alpha, memory0, *, block_size, momentum0=None, initial_state=None,
           output_final_state=False, segment_ids=None, impl="auto", activation="silu",
           debug_checks=False, interpret=False) -> (y [B, T, H, Dv], final_state | None)
    titans_step(q, k, v, theta, eta, alpha, state, memory0, *, block_size, activation="silu",
                debug_checks=False)
        -> (y [B, H, Dv], new_state)

Math (per head; see ``reference.py``): memory M linear (``{"w": [H, Dk, Dv]}``) or an MLP of depth
L >= 2 without biases (``{"w0": [H, Dk, Dh], "w1": [H, Dh, Dh], ..., "w{L-1}": [H, Dh, Dv]}``,
``M(x) = act(...act(x W0)...) W{L-1}``); with gradient block b,
G_t = grad l(R_t; k_t, v_t), l = ||M(k) - v||^2, R_t the memory after the previous block;
S_t = eta_t S_{t-1} - theta_t G_t; M_t = (1 - alpha_t) M_{t-1} + S_t; y_t = M_t(q_t).

``memory0`` is the learned initial memory (shared by the batch, [H, ...]) or a per-row memory
([B, H, ...]); a new document (``segment_ids``) resets to it. ``momentum0`` (same layout, default
zero) is the momentum before token 0. The state (``initial_state`` / ``final_state``) is a dict,
all per batch row::

    {"memory": {name: [B, H, d, d']}, "momentum": {...}, "block_start": {...}, "pos": [B] int32}

``block_start`` is the memory the next token takes its gradient at and ``pos`` the number of
tokens already in the current gradient block, so a state continues the recurrence exactly,
mid-block included. State tensors are float32 whatever the input dtype; ``y`` has q's dtype.
"""

from __future__ import annotations

from numbers import Integral

import jax
import jax.numpy as jnp

from pallas_kernels.common import (check_float, check_range, check_segment_ids, check_shape,
                                   resolve_impl, segment_masks)
from pallas_kernels.common.frame import BenchSpec, Op
from pallas_kernels.titans import gpu as _gpu
from pallas_kernels.titans import tpu as _tpu
from pallas_kernels.titans.chunked import titans_chunked
from pallas_kernels.titans.reference import (TitansState, get_activation, titans_reference,
                                              token_step)

__all__ = ["OP", "titans", "titans_step", "init_state", "memory_names"]

_STATE_KEYS = ("memory", "momentum", "block_start", "pos")
# The linear-memory Pallas kernels and the gradient-block sizes their tiles allow.
_KERNELS = {"triton": _gpu, "mosaic_tpu": _tpu}


# ------------------------------------------------------------------ the op frame's contract
# Every entry: fn(q, k, v, theta, eta, alpha, *, initial_state, segment_ids, output_final_state,
# **static) -> (y, TitansState). ``initial_state`` is the checked, batched TitansState; the
# kernels (run per (batch, head) shard) take only (memory, momentum) of a linear memory.
def _scan_form(fn):
    def run(q, k, v, theta, eta, alpha, *, initial_state, segment_ids=None,
            output_final_state=True, memory0, block_size, act):
        valid = reset = None
        if segment_ids is not None:
            valid, reset = segment_masks(segment_ids)
        return fn(q, k, v, theta, eta, alpha, memory0, initial_state, valid, reset,
                  block_size=block_size, act=act)
    return run


_reference = _scan_form(titans_reference)
_chunked = _scan_form(titans_chunked)


def _kernel_form(kernel):
    def run(q, k, v, theta, eta, alpha, *, initial_state, segment_ids=None,
            output_final_state=True, block_size, interpret=False):
        m, s = initial_state                                           # [B, H, Dk, Dv] each
        y, st = kernel(q, k, v, theta, eta, alpha, TitansState((m,), (s,), (m,), None),
                       block_size=block_size, interpret=interpret)
        return y, TitansState(st.memory, st.momentum, st.block_start, st.pos)
    return run


_triton = _kernel_form(_gpu.titans_linear_triton)
_tpu_kernel = _kernel_form(_tpu.titans_linear_tpu)


def _bench_inputs(key, B, T, H, D, memory="linear"):
    """q, k [B, T, H, D] / sqrt(D); v; θ = 0.05·σ(x), η = σ(x + 2), α = 0.05·σ(x) [B, T, H];
    memory0 linear ({"w": [H, D, D]}) or a 2-layer MLP ({"w0", "w1"})."""
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (B, T, H, D)) / D ** 0.5
    k = jax.random.normal(ks[1], (B, T, H, D)) / D ** 0.5
    v = jax.random.normal(ks[2], (B, T, H, D))
    theta = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    eta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0)
    alpha = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
    w = lambda kk: jax.random.normal(kk, (H, D, D)) / D ** 0.5
    mem0 = {"w": w(ks[6])} if memory == "linear" else {"w0": w(ks[6]), "w1": w(ks[7])}
    return q, k, v, theta, eta, alpha, mem0


_HERE = "pallas_kernels.titans.ops:"
OP = Op("titans",
        impls={"reference": _HERE + "_reference", "chunked": _HERE + "_chunked",
               "triton": _HERE + "_triton", "mosaic_tpu": _HERE + "_tpu_kernel"},
        tables={"triton": "pallas_kernels.titans.gpu:TABLE"},
        bench=BenchSpec(inputs=_bench_inputs, lengths=(1024, 4096),
                        shapes=({"B": 1, "H": 4, "D": 64, "memory": "linear"},
                                {"B": 1, "H": 4, "D": 64, "memory": "mlp2"}),
                        kwargs={"block_size": 16}))
_OP = OP.name


def memory_names(memory: dict) -> tuple[str, ...]:
    """The weight names of a memory dict in layer order: ("w",) or ("w0", ..., "w{L-1}"), L >= 2."""
    if not isinstance(memory, dict):
        raise TypeError(f"{_OP}: memory0 must be a dict of weights ({{'w': ...}} or "
                        f"{{'w0': ..., 'w1': ..., ...}}), got {type(memory).__name__}")
    keys = set(memory)
    if keys == {"w"}:
        return ("w",)
    n = len(keys)
    names = tuple(f"w{i}" for i in range(n))
    if n < 2 or keys != set(names):
        raise ValueError(f"{_OP}: memory0 keys must be {{'w'}} (linear memory) or "
                         f"{{'w0', ..., 'w<L-1>'}} with L >= 2 (MLP memory), got {sorted(keys)}")
    return names


def _check_weights(what: str, weights: dict, names, heads: int, dk: int, dv: int,
                   batch: int | None, batch_required: bool) -> tuple[jax.Array, ...]:
    """Check a weight dict against the memory layout; returns the weights in layer order.

    Each weight is [H, d_in, d_out] or [B, H, d_in, d_out]; d_in of the first is Dk, d_out of the
    last is Dv and consecutive layers chain.
    """
    if not isinstance(weights, dict) or set(weights) != set(names):
        got = sorted(weights) if isinstance(weights, dict) else type(weights).__name__
        raise ValueError(f"{_OP}: {what} must be a dict with keys {list(names)} (like memory0), "
                         f"got {got}")
    out = []
    d_in = dk
    for i, name in enumerate(names):
        w = weights[name]
        check_float(_OP, **{f"{what}[{name!r}]": w})
        d_out = dv if i == len(names) - 1 else (w.shape[-1] if w.ndim in (3, 4) else None)
        lead = (batch,) if batch_required or w.ndim == 4 else ()
        expected = lead + (heads, d_in, d_out)
        if w.ndim != len(expected) or tuple(w.shape) != expected:
            last = i == len(names) - 1
            dims = ("B=%d, " % batch if lead else "") + f"H={heads}, " + (
                f"Dk={d_in}, " if i == 0 else f"Dh={d_in}, ") + (f"Dv={dv}" if last else "Dh")
            alt = "" if batch_required else " (or with a leading batch dim [B, H, ...])"
            raise ValueError(f"{_OP}: {what}[{name!r}] must have shape [{dims}]{alt}, "
                             f"got {list(w.shape)}")
        out.append(w)
        d_in = d_out
    return tuple(out)


def _batched(ws, batch: int) -> tuple[jax.Array, ...]:
    """float32 weights with a batch dim: [H, ...] -> [B, H, ...]."""
    return tuple(jnp.broadcast_to(w.astype(jnp.float32), (batch,) + w.shape[-3:]) for w in ws)


def init_state(memory0: dict, batch: int, momentum0: dict | None = None) -> dict:
    """A fresh state dict: memory = block_start = memory0, momentum = momentum0 (or 0), pos = 0."""
    names = memory_names(memory0)
    mem = _batched([memory0[n] for n in names], batch)
    mom = (tuple(jnp.zeros_like(m) for m in mem) if momentum0 is None
           else _batched([momentum0[n] for n in names], batch))
    return _state_dict(TitansState(mem, mom, mem, jnp.zeros((batch,), jnp.int32)), names)


def _state_dict(state: TitansState, names) -> dict:
    return {"memory": dict(zip(names, state.memory)), "momentum": dict(zip(names, state.momentum)),
            "block_start": dict(zip(names, state.block_start)), "pos": state.pos}


def _check_state(what: str, state, names, heads, dk, dv, batch) -> TitansState:
    if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{_OP}: {what} must be a dict with keys {list(_STATE_KEYS)}, got {got}")
    parts = [_check_weights(f"{what}[{key!r}]", state[key], names, heads, dk, dv, batch, True)
             for key in _STATE_KEYS[:3]]
    pos = state["pos"]
    check_shape(_OP, f"{what}['pos']", pos, (batch,))
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise TypeError(f"{_OP}: {what}['pos'] must be an integer array [B], got {pos.dtype}")
    return TitansState(*(_batched(p, batch) for p in parts), pos.astype(jnp.int32))


def _check_gate_values(theta, eta, alpha) -> None:
    """``debug_checks``: θ >= 0, η and α in [0, 1] (checkify; see ``common.check_range``)."""
    check_range(_OP, "theta", theta, lo=0.0)
    check_range(_OP, "eta", eta, 0.0, 1.0)
    check_range(_OP, "alpha", alpha, 0.0, 1.0)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
        raise ValueError(f"{_OP}: block_size must be a positive int, got {block_size!r}")
    return int(block_size)


@OP.entry
def titans(q, k, v, theta, eta, alpha, memory0, *, block_size: int, momentum0=None,
           initial_state=None, output_final_state: bool = False, segment_ids=None,
           impl: str = "auto", activation: str = "silu", debug_checks: bool = False,
           interpret: bool = False):
    """Titans neural long-term memory over a sequence.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; theta (step size), eta (momentum decay), alpha
    (forgetting) [B, T, H]; memory0 a weight dict (module docstring); segment_ids [B, T] int
    (0 = trailing padding). ``initial_state`` (a state dict from a previous call) replaces
    memory0/momentum0 as the state before token 0; memory0 stays the reset target of later
    documents. ``debug_checks=True`` verifies θ >= 0 and η, α in [0, 1] with ``checkify``
    (raises eagerly; under ``jax.jit`` wrap the jitted caller in ``checkify.checkify``).
    ``impl="triton"`` / ``"mosaic_tpu"`` (the GPU / TPU default where they apply) run the Pallas
    kernels of ``gpu.py`` / ``tpu.py``: linear memory, no ``segment_ids`` / ``initial_state``,
    block_size a power of two in 16..64 (Triton) or a multiple of 8 (TPU); elsewhere "auto" takes
    "chunked". ``interpret`` runs the kernels in Pallas' interpreter.
    Returns (y [B, T, H, Dv] in q's dtype, final state dict or None).
    """
    check_float(_OP, q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha)
    if q.ndim != 4:
        raise ValueError(f"{_OP}: q must have shape [B, T, H, Dk], got {list(q.shape)}")
    bsz, t_len, heads, dk = q.shape
    if t_len < 1:
        raise ValueError(f"{_OP}: q must have at least one token (T >= 1), got T={t_len}")
    check_shape(_OP, "k", k, (bsz, t_len, heads, dk))
    check_shape(_OP, "v", v, (bsz, t_len, heads, None))
    dv = v.shape[-1]
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        check_shape(_OP, name, g, (bsz, t_len, heads))
    block_size = _check_block_size(block_size)
    act = get_activation(activation)
    check_segment_ids(_OP, segment_ids, bsz, t_len)
    names = memory_names(memory0)
    simple = names == ("w",) and segment_ids is None and initial_state is None
    kernels = tuple(name for name, mod in _KERNELS.items() if simple and mod.supports(block_size))
    if impl in _KERNELS and impl not in kernels:
        raise ValueError(f"{_OP}: impl={impl!r} runs a linear memory ({{'w': ...}}) with no "
                         f"segment_ids or initial_state and block_size "
                         f"{_KERNELS[impl].BLOCK_RULE} (got keys {list(names)}, "
                         f"block_size={block_size}, segment_ids "
                         f"{'set' if segment_ids is not None else 'None'}, initial_state "
                         f"{'set' if initial_state is not None else 'None'}); use "
                         f"impl='chunked'")
    arrays = (q, k, v, theta, eta, alpha)
    # A kernel the mesh cannot shard gives way to "chunked" here: the two take other arguments.
    impl = OP.placed(resolve_impl(_OP, impl, ("reference", "chunked") + kernels), arrays)
    if debug_checks:
        _check_gate_values(theta, eta, alpha)

    mem0 = _check_weights("memory0", memory0, names, heads, dk, dv, bsz, False)
    mem0 = tuple(w.astype(jnp.float32) for w in mem0)
    mem0 = tuple(w if w.ndim == 4 else w[None] for w in mem0)  # [B|1, H, d, d']
    if initial_state is not None:
        if momentum0 is not None:
            raise ValueError(f"{_OP}: pass momentum0 or initial_state, not both (the state "
                             f"already holds the momentum)")
        state0 = _check_state("initial_state", initial_state, names, heads, dk, dv, bsz)
    else:
        mem = _batched(mem0, bsz)
        if momentum0 is None:
            mom = tuple(jnp.zeros_like(m) for m in mem)
        else:
            mom = _batched(_check_weights("momentum0", momentum0, names, heads, dk, dv, bsz,
                                          False), bsz)
        state0 = TitansState(mem, mom, mem, None)  # pos None: statically 0

    if impl in _KERNELS:                              # per shard: [B, H, ...] state only
        y, final = OP.run(impl, arrays, initial_state=(state0.memory[0], state0.momentum[0]),
                          output_final_state=True, interpret=interpret, block_size=block_size)
    else:
        y, final = OP.run(impl, arrays, initial_state=state0, segment_ids=segment_ids,
                          output_final_state=True, memory0=mem0, block_size=block_size, act=act)
    y = y.astype(q.dtype)
    if not output_final_state:
        return y, None
    return y, _state_dict(final, names)


def titans_step(q, k, v, theta, eta, alpha, state, memory0, *, block_size: int,
                activation: str = "silu", debug_checks: bool = False):
    """One decoding token: q, k [B, H, Dk]; v [B, H, Dv]; theta, eta, alpha [B, H].

    ``state`` is a state dict (from ``titans(..., output_final_state=True)``, ``init_state`` or a
    previous step) or None for a fresh one built from ``memory0``. Returns (y [B, H, Dv] in q's
    dtype, new state dict). Token-by-token decoding equals ``titans`` on the whole sequence,
    gradient-block boundaries included. ``debug_checks`` as in ``titans``.
    """
    check_float(_OP, q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha)
    if q.ndim != 3:
        raise ValueError(f"{_OP}_step: q must have shape [B, H, Dk], got {list(q.shape)}")
    bsz, heads, dk = q.shape
    check_shape(_OP, "k", k, (bsz, heads, dk))
    check_shape(_OP, "v", v, (bsz, heads, None))
    dv = v.shape[-1]
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        check_shape(_OP, name, g, (bsz, heads))
    block_size = _check_block_size(block_size)
    act = get_activation(activation)
    if debug_checks:
        _check_gate_values(theta, eta, alpha)
    names = memory_names(memory0)
    mem0 = _batched(_check_weights("memory0", memory0, names, heads, dk, dv, bsz, False), bsz)
    if state is None:
        state0 = TitansState(mem0, tuple(jnp.zeros_like(m) for m in mem0), mem0,
                             jnp.zeros((bsz,), jnp.int32))
    else:
        state0 = _check_state("state", state, names, heads, dk, dv, bsz)
    valid = jnp.ones((bsz,), bool)
    reset = jnp.zeros((bsz,), bool)
    new, y = token_step(state0, q, k, v, theta, eta, alpha, valid, reset, mem0,
                        block_size=block_size, act=act)
    return y.astype(q.dtype), _state_dict(new, names)
