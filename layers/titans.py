"""Titans neural long-term memory (Behrouz et al., "Titans: Learning to Memorize at Test Time"):
the memory core shared by every Titans mixer, and the memory-as-a-layer mixer (`titans`).

Memory core, per head h (D = head_dim):

    q, k, v = SiLU(conv4_q(x W_q)), SiLU(conv4_k(x W_k)), SiLU(conv4_v(x W_v))  # causal, depthwise
    q, k = q / ‖q‖, k / ‖k‖                                            # x / sqrt(Σx² + 1e-6)
    η_t = σ(x_t W_η + b_η)                   (momentum, η ≈ 0.9 at init)        # [B, T, H]
    θ_t = θ_max · σ(x_t W_θ + b_θ) · (1 − η_t)   (learning rate, damped)
    α_t = σ(x_t W_α + b_α)                   (forgetting, α ≈ 0.02 at init)
    G_t = ∇_M ‖M(k_t) − v_t‖²  (taken at the memory of the gradient block's start)
    S_t = η_t S_{t−1} − θ_t G_t,   M_t = (1 − α_t) M_{t−1} + S_t,   y_t = M_t(q_t)

M is linear (`memory_depth=1`, M(x) = x W) or a bias-free MLP of depth ≥ 2 with hidden width
`memory_hidden` and activation `activation`; its learned initial value `memory0` is also the
state every document starts from. The recurrence is the `titans` op (`pallas_kernels/titans`),
block-parallel within gradient blocks of `block_size` = b tokens (default 16). These settings
are one frozen dataclass, `MemoryOptions`, taken as `memory=` by `NeuralMemory`, `Titans`,
`TitansMAG` and `TitansMAC`; the mixer registry offers its fields as
`model.mixer_options[<mixer>][<field>]`.

Why θ is damped by (1 − η) and bounded by θ_max = 1/b. All b gradients of a block are taken at
the block-start memory, and momentum keeps feeding each of them into M for ~1/(1 − η) tokens
before it is re-evaluated. Undamped, that stale heavy ball diverges as η → 1 at any θ: for b
keys along one unit direction (curvature 2 along k) a block of 16 is stable only for θ < 0.062
at η = 0, θ < 0.009 at η = 0.9 and θ ≈ 0 at η = 0.99, and with θ ≤ 0.5 real training went to
NaN (memory weights 1e13 within 64 tokens of an MQAR batch, step 95). With the (1 − η) factor the
momentum is an average of gradients, the total step a gradient ever gets is θ_max σ(·) whatever η,
and the same block is stable for θ·2·b ≤ 2, i.e. θ_max ≤ 1/b, for every η (η = 0 is the
tightest: 1/16 at b = 16; η = 0.9 allows 0.094). The default θ_max = 1/b keeps the memory
bounded even on a block of repeated tokens (proved above for linear memory; tested for the 2-layer
MLP too, whose curvature at init is about the same); a larger θ_max learns recall a little faster (MQAR 256:64:4
reached 0.99 in 1000 steps with θ_max = 0.5 vs 1500 with 1/16) but gives up that guarantee. The
output RMSNorm removes the write scale, so small steps cost little in recall.

`Titans` (mixer `titans`, memory as a layer):

    y = (RMSNorm_head(y_mem) ⊙ SiLU(x W_gate)) W_o

MAL (memory as a layer followed by attention) is `layer_types = (..., "titans", "swa", ...)`.
There are no persistent tokens here: prepending fixed learned tokens to the memory's input stream
only moves the memory to a fixed state before the first real token — a learned initial memory,
which `memory0` already is. (MAG and MAC, in `layers/titans_variants.py`, put persistent tokens
into their attention as always-visible sinks.)

Weight decay: the θ/η/α projections (weights and biases) are tagged `no_decay` — they set the
memory's operating point; norms and biases too. The cache is the q, k, v short convolutions'
inputs and the op's state dict {memory, momentum, block_start, pos}; decoding (T = 1) uses
`titans_step`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import GatedRMSNorm, Linear, StreamConvs, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.titans import ACTIVATIONS, init_state, memory_names, titans, titans_step

__all__ = ["MemoryOptions", "NeuralMemory", "Titans", "memory_read"]

# The op and its step, jitted: eager callers compile one program per shape instead of dispatching
# each primitive (under an outer jit these are inlined).
_STATIC = ("block_size", "output_final_state", "impl", "activation")
_titans = jax.jit(titans, static_argnames=_STATIC)
_titans_step = jax.jit(titans_step, static_argnames=("block_size", "activation"))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _l2norm(x, eps: float = 1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """The memory core's settings (module docstring), checked when made.

    memory_depth   1: linear memory M(x) = x W; L >= 2: a bias-free MLP of L layers.
    memory_hidden  the MLP's hidden width (None: head_dim).
    activation     between the MLP's layers, one of `pallas_kernels.titans.ACTIVATIONS`.
    block_size     the gradient block b: a block's gradients are all taken at its start memory.
    conv_size      kernel of the q, k and v short convolutions.
    theta_max      bound of the learning rate θ (None: 1 / block_size, the bound at which a block
                   of repeated tokens cannot diverge, module docstring).
    theta_init     θ at init, θ_max·σ(b_θ) (None: theta_max / 5).
    eta_init       momentum η at init (0.9).
    alpha_init     forgetting α at init (0.02).
    """
    memory_depth: int = 2
    memory_hidden: int | None = None
    activation: str = "silu"
    block_size: int = 16
    conv_size: int = 4
    theta_max: float | None = None
    theta_init: float | None = None
    eta_init: float = 0.9
    alpha_init: float = 0.02

    def __post_init__(self):
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryOptions: {name} must be a positive int"
                                 f"{' or None' if allow_none else ''}, got {value!r}")
        positive_int("memory_depth")
        positive_int("memory_hidden", allow_none=True)
        positive_int("block_size")
        positive_int("conv_size")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MemoryOptions: activation {self.activation!r} is not one of "
                             f"{tuple(ACTIVATIONS)}")
        theta_max, theta_init = self.theta_bounds
        if not 0.0 < theta_init < theta_max:
            raise ValueError(f"MemoryOptions: need 0 < theta_init ({theta_init}) < theta_max "
                             f"({theta_max})")
        for name in ("eta_init", "alpha_init"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"MemoryOptions: {name} must be in (0, 1), got "
                                 f"{getattr(self, name)!r}")

    @property
    def theta_bounds(self) -> tuple[float, float]:
        """(θ_max, θ_init) with the defaults filled in: 1 / block_size and θ_max / 5."""
        theta_max = 1.0 / self.block_size if self.theta_max is None else float(self.theta_max)
        theta_init = theta_max / 5 if self.theta_init is None else float(self.theta_init)
        return theta_max, theta_init


def memory_read(weights: dict, x, activation: str = "silu"):
    """M(x) for memory weights {name: [B, H, d, d'] or [H, d, d']} and x [B, T, H, Dk].

    Returns [B, T, H, Dv] float32: the map the op applies (act between layers, none after the
    last)."""
    act = ACTIVATIONS[activation]
    names = memory_names(weights)
    h = x.astype(jnp.float32)
    for i, name in enumerate(names):
        w = weights[name].astype(jnp.float32)
        h = jnp.einsum("bthi,bhio->btho" if w.ndim == 4 else "bthi,hio->btho", h, w)
        if i < len(names) - 1:
            h = act(h)
    return h


class NeuralMemory(nnx.Module):
    """The memory core: projections, short convolution, gates, learned memory0, the op call.

    Used by `Titans` and by the MAG / MAC variants; it has no output projection of its own.
    """

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int | None = None,
                 memory: MemoryOptions = MemoryOptions(), impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        """``memory``: the core's settings (`MemoryOptions`)."""
        if not isinstance(memory, MemoryOptions):
            raise TypeError(f"NeuralMemory: memory must be a MemoryOptions, got "
                            f"{type(memory).__name__}")
        head_dim = head_dim or d_model // num_heads
        theta_max, theta_init = memory.theta_bounds
        self.options = memory
        self.h, self.d = num_heads, head_dim
        self.block_size, self.activation = memory.block_size, memory.activation
        self.theta_max = theta_max
        self.impl, self.dtype = impl, dtype
        hd = num_heads * head_dim
        lin = lambda: Linear(d_model, hd, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(), lin(), lin()
        self.conv = StreamConvs({"q": hd, "k": hd, "v": hd}, memory.conv_size, activation=True,
                                dtype=dtype, rngs=rngs)
        # θ, η, α: one projection d_model -> [3, H] (split on its own axis of 3, heads whole: the
        # layer contract allows it); the biases set the initial operating point.
        gate_init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal",
                                                      in_axis=0, out_axis=(1, 2))
        self.gate_w = make_param(rngs, gate_init, (d_model, 3, num_heads), ("embed", None, "heads"),
                                 no_decay=True)
        bias = jnp.array([_logit(theta_init / theta_max), _logit(memory.eta_init),
                          _logit(memory.alpha_init)], jnp.float32)
        self.gate_b = make_param(None, jnp.broadcast_to(bias[:, None], (3, num_heads)),
                                 (3, num_heads), (None, "heads"), no_decay=True)
        # Learned initial memory: {"w": [H, D, D]} or {"w0": [H, D, Dh], ..., "w{L-1}": [H, Dh, D]}.
        depth, hidden = memory.memory_depth, memory.memory_hidden or head_dim
        dims = [head_dim] + [hidden] * (depth - 1) + [head_dim]
        names = ("w",) if depth == 1 else tuple(f"w{i}" for i in range(depth))
        self.memory_names = names
        w_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                   in_axis=-2, out_axis=-1, batch_axis=(0,))
        for i, name in enumerate(names):
            setattr(self, f"memory0_{name}", make_param(
                rngs, w_init, (num_heads, dims[i], dims[i + 1]), ("heads", None, None)))

    def memory0(self) -> dict:
        """The learned initial memory {name: [H, d, d']} (float32)."""
        return {name: getattr(self, f"memory0_{name}")[...] for name in self.memory_names}

    def init_state(self, batch: int) -> dict:
        """The op state of a fresh row: memory = block_start = memory0, momentum 0, pos 0."""
        return init_state(self.memory0(), batch)

    def init_conv_cache(self, batch: int, dtype=jnp.float32):
        return self.conv.init_cache(batch, dtype)

    def memory_size(self) -> tuple[int, int]:
        """(P, P_0): weights of one head's memory, P = Σ_i d_i·d_{i+1}, and of its first layer."""
        sizes = [math.prod(getattr(self, f"memory0_{n}").shape[1:]) for n in self.memory_names]
        return sum(sizes), sizes[0]

    def state_bytes(self) -> int:
        """One row of the op state: memory, momentum and block-start memory, 3·4·H·P bytes
        (float32), + 4 for the position in the block (int32)."""
        return 3 * 4 * self.h * self.memory_size()[0] + 4

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the core, independent of the sequence length:
        3·2·d·H·D (q, k, v) + 2·d·3·H (θ, η, α) + 2·3·H·D·conv_size (the q, k, v convs)
        + H·(11·P − 2·P_0) for the memory of P weights per head (first layer P_0), per weight:
        read M(q) 2, forward M(k) at the block-start memory 2, back-propagation of the error to
        the hidden layers 2 (not into the first layer: 2·(P − P_0)), momentum
        S = ηS − (θh)δᵀ 3 (gradient outer product folded in), forgetting M = (1 − α)M + S 2.
        Linear memory (P = P_0 = D²): 9·H·D². Activations, L2 norms and gates are O(d), not
        counted."""
        projs = sum(p.flops_per_token() for p in (self.q_proj, self.k_proj, self.v_proj))
        gates = 2 * math.prod(self.gate_w.shape)
        p, p0 = self.memory_size()
        return float(projs + gates + self.conv.flops_per_token() + self.h * (11 * p - 2 * p0))

    def project(self, x, *, segment_ids=None, conv_cache=None):
        """x [B, T, d_model] -> (q, k, v [B, T, H, D], (θ, η, α) [B, T, H] f32, conv cache)."""
        b, t, _ = x.shape
        streams, conv_cache = self.conv(
            {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)},
            segment_ids=segment_ids, cache=conv_cache)
        shape = (b, t, self.h, self.d)
        q, k = _l2norm(streams["q"].reshape(shape)), _l2norm(streams["k"].reshape(shape))
        v = streams["v"].reshape(shape)  # q, k, v [B, T, H, D]
        logits = jnp.einsum("btd,dgh->btgh", x.astype(jnp.float32), self.gate_w[...])
        gates = jax.nn.sigmoid(logits + self.gate_b[...])  # [B, T, 3, H]
        eta = gates[:, :, 1]
        theta = self.theta_max * gates[:, :, 0] * (1.0 - eta)  # damped: module docstring
        return q, k, v, (theta, eta, gates[:, :, 2]), conv_cache

    def recur(self, q, k, v, gates, *, segment_ids=None, state=None):
        """The memory over a sequence: (y [B, T, H, D], new state or None).

        ``state`` (an op state dict, e.g. `init_state`) continues a row and the new state is
        returned; a single token without ``segment_ids`` takes the op's step form."""
        theta, eta, alpha = gates
        mem0 = self.memory0()
        options = dict(block_size=self.block_size, activation=self.activation)
        return sequence_or_step(
            lambda *a, **kw: _titans(*a, mem0, **kw),
            lambda *a, **kw: _titans_step(*a, mem0, **kw),
            q, k, v, theta, eta, alpha, state=state, segment_ids=segment_ids, impl=self.impl,
            **options)


class Titans(nnx.Module):
    """Memory as a layer: y = (RMSNorm_head(M_t(q_t)) ⊙ SiLU(x W_gate)) W_o (module docstring)."""

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int | None = None,
                 memory: MemoryOptions = MemoryOptions(), norm_eps: float = 1e-5,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        """``memory``: the memory core's settings (`MemoryOptions`)."""
        self.memory = NeuralMemory(d_model, num_heads=num_heads, head_dim=head_dim, memory=memory,
                                   impl=impl, dtype=dtype, rngs=rngs)
        hd = num_heads * self.memory.d
        self.g_proj = Linear(d_model, hd, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o_norm = GatedRMSNorm(hd, group_size=self.memory.d, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(hd, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"conv": self.memory.init_conv_cache(batch, dtype),
                "memory": self.memory.init_state(batch)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """Independent of context_len: the op state (`NeuralMemory.state_bytes`: 12·H·P + 4,
        float32 memory/momentum/block start and an int32 position) + the q, k, v convs' inputs
        (conv_size − 1)·3·H·D·itemsize(dtype)."""
        return self.memory.state_bytes() + self.memory.conv.cache_bytes(dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Independent of seq_len: the memory core (`NeuralMemory.flops_per_token`)
        + 2·d·H·D (gate) + 2·H·D·d (o). The gated norm is O(d), not counted."""
        return float(self.memory.flops_per_token() + self.g_proj.flops_per_token()
                     + self.o_proj.flops_per_token())

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache). `positions` is not used."""
        b, t, _ = x.shape
        q, k, v, gates, conv_cache = self.memory.project(
            x, segment_ids=segment_ids, conv_cache=None if cache is None else cache["conv"])
        y, state = self.memory.recur(q, k, v, gates, segment_ids=segment_ids,
                                     state=None if cache is None else cache["memory"])
        y = self.o_norm(y.reshape(b, t, -1), self.g_proj(x))  # [B, T, H·D]
        new_cache = None if cache is None else {"conv": conv_cache, "memory": state}
        return self.o_proj(y), new_cache
