"""Sampling with the layers' caches: prefill a batch of prompts of different lengths with the
parallel form, then decode one token at a time with the recurrent form.

`sample_logits` implements greedy, temperature, top-k and top-p (nucleus) sampling:
  p ∝ softmax(logits / T) restricted to the k most likely tokens and to the smallest set whose
  mass reaches top_p.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["sample_logits", "generate", "pad_prompts"]


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False):
    """logits [B, V] -> tokens [B] int32."""
    if greedy or temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(prompts: Sequence[Sequence[int]]):
    """Right-pad token lists: (tokens [B, T] int32, lengths [B] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "greedy", "cache_dtype"))
def _generate(state, tokens, lengths, key, *, graphdef, max_new_tokens, temperature, top_k, top_p,
              greedy, cache_dtype):
    """Prefill [B, T] right-padded prompts, then decode; jitted once per shape and settings."""
    b, t = tokens.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               greedy=greedy)
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(b, t + max_new_tokens, cache_dtype)
    seg = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)
    logits, cache = m(tokens, segment_ids=seg, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    key, sub = jax.random.split(key)
    first = sample(last, sub)

    def step(carry, _):
        tok, cache, key = carry
        logits, cache = m(tok[:, None], cache=cache)
        key, sub = jax.random.split(key)
        return (sample(logits[:, 0], sub), cache, key), tok

    _, out = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens)
    return out.T  # [B, max_new_tokens]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             seed: int = 0, cache_dtype=jnp.float32) -> np.ndarray:
    """Continue each prompt by `max_new_tokens` tokens. Returns [B, max_new_tokens] int32."""
    tokens, lengths = pad_prompts(prompts)
    graphdef, state = nnx.split(model)
    out = _generate(state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                    graphdef=graphdef, max_new_tokens=int(max_new_tokens),
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    greedy=bool(greedy), cache_dtype=jnp.dtype(cache_dtype))
    return np.asarray(out)
