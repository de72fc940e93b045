"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random number hidden at a chosen depth in
filler text, asked for at the end.

    <filler …> The pass key is 48213. Remember it. 48213 is the pass key. <filler …>
    What is the pass key? The pass key is

The model is correct when its greedy continuation starts with the number. Lengths are counted in
tokens of the given tokenizer; depth is the needle's relative position in the filler (0 = start).
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_passkey_prompt", "FILLER", "QUESTION"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def make_passkey_prompt(tokenizer, length: int, depth: float, rng: np.random.Generator,
                        digits: int = 5) -> tuple[np.ndarray, str]:
    """A prompt of about `length` tokens (never more) and the passkey string to recall."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must lie in [0, 1], got {depth}")
    key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tokenizer.encode(QUESTION)
    filler_unit = tokenizer.encode(FILLER)
    budget = length - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey length {length} is shorter than the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    filler = np.resize(filler_unit, budget)
    cut = int(round(depth * budget))
    prompt = np.concatenate([filler[:cut], needle, filler[cut:], question]).astype(np.int32)
    return prompt, key
