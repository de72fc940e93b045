"""The language model: embedding -> blocks[layer_types] -> final RMSNorm -> (tied) head.

Each block is pre-norm mixer + residual, then pre-norm SwiGLU MLP + residual:
    h = x + mixer(RMSNorm(x)),   y = h + MLP(RMSNorm(h)).
Positions for rotary embedding are counted from each document's start (from `segment_ids`).
The cache is a list with one entry per layer (each layer's own cache) — decoding continues
every layer from where prefill left it.

Layouts. `model.scan_layers` with a periodic `layer_types` (period p, R = n / p repeats, see
`zoo.config.layer_period`) builds one group module of p blocks whose variables are stacked over
the R repeats (leading logical axis "layers", on no mesh axis) and applies it with `lax.scan`,
so the traced program — and compile time — does not grow with depth. The repeats are built
exactly like the loop's blocks (same order, same rngs), then stacked: the scanned model with a
seed holds the looped model's weights. The cache is then a list of p entries, each stacked over
the R repeats. A list with R = 1, or repeats whose structure differs (e.g. HGRN's layer 0 has no
lower-bound parameter), falls back to the loop with a logged note.

Sharding. Activations are pinned with `layers.partitioning.constrain`: the residual stream and
each mixer's input and output ("batch", None, "embed"), the MLP hidden ("batch", None, "mlp"),
the logits ("batch", None, "vocab"). Without them XLA may pick an activation's layout from a
neighbouring FSDP-sharded weight and all-gather the batch.

Remat (`model.remat`), per block: "none" saves every residual; "save_dots" saves the outputs of
matmuls without batch dimensions (`dots_with_no_batch_dims_saveable`: the projections, O(T·d)
each) and recomputes the rest — attention scores and the chunked forms' intra-chunk products are
batched dots (over B, H), O(T²) or O(T·C) per head, so they are exactly what should not be kept;
"full" saves only each block's input.

Costs come from the layers (their contract: layers/common.py), never from matching mixer names:
    flops_per_token(T) = Σ_blocks [mixer.flops_per_token(T) + 3·2·d·d_ff] + 2·d·V
(the embedding lookup is free; norms are O(d) and not counted), training ≈ 3× that (the
backward pass is ≈ 2× the forward), and cache_bytes(L) = Σ_blocks mixer.cache_bytes(L).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import RMSNorm, SwiGLU, make_param, positions_from_segments
from layers.partitioning import constrain
from zoo.config import ModelConfig, layer_period
from zoo.registry import get_mixer

__all__ = ["Block", "BlockGroup", "LM", "count_params", "cross_entropy", "stack_layer_params",
           "REMAT_POLICY"]

log = logging.getLogger(__name__)

RESIDUAL = ("batch", None, "embed")           # [B, T, D]
LOGITS = ("batch", None, "vocab")             # [B, T, V]

# model.remat -> jax.checkpoint policy (module docstring); "none" is no checkpoint at all
REMAT_POLICY = {
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.mixer_name = cfg.layer_types[layer_idx]
        self.norm1 = RMSNorm(cfg.d_model, dtype=dtype)
        self.mixer = get_mixer(self.mixer_name)(cfg, layer_idx, rngs)
        self.norm2 = RMSNorm(cfg.d_model, dtype=dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        x = constrain(x, RESIDUAL)                                            # [B, T, D]
        h, cache = self.mixer(constrain(self.norm1(x), RESIDUAL), segment_ids=segment_ids,
                              positions=positions, cache=cache)
        x = x + constrain(h, RESIDUAL).astype(x.dtype)
        x = x + constrain(self.mlp(self.norm2(x)), RESIDUAL).astype(x.dtype)
        return constrain(x, RESIDUAL), cache


def apply_block(blk: Block, x, remat: str, *, segment_ids=None, positions=None, cache=None):
    """One block, under the remat policy `remat` when training (no cache)."""
    if remat == "none" or cache is not None:
        return blk(x, segment_ids=segment_ids, positions=positions, cache=cache)
    fn = nnx.remat(lambda b, x, seg, pos: b(x, segment_ids=seg, positions=pos),
                   policy=REMAT_POLICY[remat])
    return fn(blk, x, segment_ids, positions)


class BlockGroup(nnx.Module):
    """Blocks layer_idxs[0], layer_idxs[1], ... applied in order: one repeat of a periodic
    layer_types (the unit that `lax.scan` steps over)."""

    def __init__(self, cfg: ModelConfig, layer_idxs, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in layer_idxs])

    def __call__(self, x, *, remat="none", segment_ids=None, positions=None, cache=None):
        new_cache = [] if cache is not None else None
        for j, blk in enumerate(self.blocks):
            x, c = apply_block(blk, x, remat, segment_ids=segment_ids, positions=positions,
                               cache=None if cache is None else cache[j])
            if new_cache is not None:
                new_cache.append(c)
        return x, new_cache


_is_var = lambda x: isinstance(x, nnx.Variable)
_noted: set = set()


def _stack_groups(groups: list[BlockGroup]) -> BlockGroup | None:
    """One BlockGroup whose every variable is the [R, ...] stack of the groups' (logical axes
    ("layers", ...)); None when the groups differ in structure (they cannot share one body)."""
    split = [nnx.split(g) for g in groups]
    graphdef = split[0][0]
    if any(gd != graphdef for gd, _ in split[1:]):
        return None

    def stack(*vs):
        out = vs[0].replace(jnp.stack([v[...] for v in vs]))                  # [R, ...]
        axes = vs[0].get_metadata().get("logical_axes") or (None,) * vs[0][...].ndim
        out.set_metadata(logical_axes=("layers",) + tuple(axes))
        return out
    return nnx.merge(graphdef, jax.tree.map(stack, *[s for _, s in split], is_leaf=_is_var))


def _first_repeat(a):
    """Repeat 0 of a stacked leaf (shapes only when the model is abstract)."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[0]


class LM(nnx.Module):
    """A decoder-only LM over `cfg.layer_types`. Logits are float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # std d^-1/2 keeps tied-head logits O(1); inputs are scaled by sqrt(d) back to unit RMS.
        self.embed = make_param(rngs, nnx.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        # exactly one of blocks (the loop) / groups (scanned, R = repeats) holds the blocks
        blocks, stacked, repeats = None, None, 1
        n, p = cfg.n_layers, layer_period(cfg.layer_types)
        if cfg.scan_layers and n // p > 1:
            groups = [BlockGroup(cfg, range(k * p, (k + 1) * p), rngs=rngs) for k in range(n // p)]
            stacked = _stack_groups(groups)
            if stacked is not None:
                repeats = n // p
            else:
                self._note(f"model.scan_layers: the {n // p} repeats of {cfg.layer_types[:p]} "
                           f"differ in structure; running the {n} blocks in a loop")
                blocks = nnx.List([b for g in groups for b in g.blocks])
        else:
            if cfg.scan_layers:
                self._note(f"model.scan_layers: layer_types {cfg.layer_types} is not periodic; "
                           f"running the {n} blocks in a loop")
            blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(n)])
        self.blocks, self.groups, self.repeats = nnx.data(blocks), nnx.data(stacked), repeats
        self.final_norm = RMSNorm(cfg.d_model, dtype=jnp.dtype(cfg.dtype))
        self.head = (None if cfg.tie_embeddings else
                     make_param(rngs, nnx.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.d_model, cfg.vocab_size), ("embed", "vocab")))

    @staticmethod
    def _note(msg: str) -> None:
        if msg not in _noted:      # the model is built several times (shapes, init): say it once
            _noted.add(msg)
            log.warning(msg)

    @property
    def scanned(self) -> bool:
        return self.groups is not None

    def _group_repeat0(self) -> BlockGroup:
        """The first repeat of the stacked group as a module of its own (for costs, caches)."""
        graphdef, state = nnx.split(self.groups)
        return nnx.merge(graphdef, jax.tree.map(_first_repeat, state))

    def _layer_blocks(self) -> list[tuple[Block, int]]:
        """(block, how many layers it stands for): each scanned block stands for R layers."""
        if self.scanned:
            return [(b, self.repeats) for b in self._group_repeat0().blocks]
        return [(b, 1) for b in self.blocks]

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        """One cache per layer; scanned: one per group position, stacked over the R repeats."""
        if not self.scanned:
            return [blk.mixer.init_cache(batch, max_len, dtype) for blk in self.blocks]
        r = self.repeats
        stack = lambda c: jnp.broadcast_to(c, (r,) + c.shape)
        return [jax.tree.map(stack, blk.mixer.init_cache(batch, max_len, dtype))
                for blk in self._group_repeat0().blocks]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length seq_len: every block's mixer and SwiGLU
        MLP (3·2·d·d_ff) and the output head 2·d·V (module docstring)."""
        blocks = sum(k * (blk.mixer.flops_per_token(seq_len) + blk.mlp.flops_per_token())
                     for blk, k in self._layer_blocks())
        return float(blocks + 2 * self.cfg.d_model * self.cfg.vocab_size)

    def train_flops_per_token(self, seq_len: int) -> float:
        """3 × forward: the backward pass costs ≈ 2× the forward (input and weight gradients)."""
        return 3.0 * self.flops_per_token(seq_len)

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """Decode cache bytes of one sequence after context_len tokens: Σ over layers of
        mixer.cache_bytes (= the nbytes of `init_cache(1, context_len, dtype)`)."""
        return sum(k * blk.mixer.cache_bytes(context_len, dtype) for blk, k in self._layer_blocks())

    def _scan_blocks(self, x, *, segment_ids, positions, cache):
        """lax.scan of the group body over the R stacked repeats (and their caches)."""
        graphdef, state = nnx.split(self.groups)
        remat = self.cfg.remat

        def body(x, xs):
            params, layer_cache = xs
            group = nnx.merge(graphdef, nnx.State(params))
            return group(x, remat=remat, segment_ids=segment_ids, positions=positions,
                         cache=layer_cache)

        return jax.lax.scan(body, x, (nnx.to_pure_dict(state), cache))

    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, cache or None)."""
        dtype = jnp.dtype(self.cfg.dtype)
        # The table is FSDP-gathered before the lookup (its vocab split over tensor kept): gathering
        # rows of a table whose embed dim is split would all-gather the batch's token ids instead.
        table = constrain(self.embed[...], ("vocab", None))                  # [V, D]
        x = (jnp.take(table, tokens, axis=0) * self.cfg.d_model ** 0.5).astype(dtype)  # [B, T, D]
        x = constrain(x, RESIDUAL)
        if positions is None and segment_ids is not None and cache is None:
            positions = positions_from_segments(segment_ids)
        if self.scanned:
            x, new_cache = self._scan_blocks(x, segment_ids=segment_ids, positions=positions,
                                             cache=cache)
        else:
            new_cache = [] if cache is not None else None
            for i, blk in enumerate(self.blocks):
                x, layer_cache = apply_block(blk, x, self.cfg.remat, segment_ids=segment_ids,
                                             positions=positions,
                                             cache=None if cache is None else cache[i])
                if new_cache is not None:
                    new_cache.append(layer_cache)
        x = self.final_norm(x)
        w = self.embed[...].T if self.head is None else self.head[...]
        logits = jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        return constrain(logits, LOGITS), new_cache


def stack_layer_params(params: dict, period: int) -> dict:
    """A looped model's state dict -> the scanned layout of the same weights.

    params["blocks"][k·p + j] (k < R repeats, j < p = period) becomes
    params["groups"]["blocks"][j] with every leaf stacked [R, ...] over k; other entries pass
    through. (nnx.List keys are ints.)"""
    blocks = params["blocks"]
    n = len(blocks)
    if period < 1 or n % period:
        raise ValueError(f"stack_layer_params: period {period} does not divide {n} blocks")
    stacked = {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[blocks[k * period + j] for k in range(n // period)])
               for j in range(period)}
    out = {k: v for k, v in params.items() if k != "blocks"}
    out["groups"] = {"blocks": stacked}
    return out


def cross_entropy(logits, targets):
    """Mean next-token loss over scored positions (targets >= 0; −100 marks unscored).

    Returns (mean loss, number of scored tokens)."""
    mask = targets >= 0
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - picked, 0.0)
    n = jnp.sum(mask)
    return jnp.sum(nll) / jnp.maximum(n, 1), n


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param; the stored constants are not counted)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
