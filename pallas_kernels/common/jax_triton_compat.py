"""Where jax_triton lags the installed jax: a small patch applied once, on first use.

jax_triton 0.4.1 registers a dead-code-elimination rule for its ``triton_kernel_call`` primitive
that takes ``(used_outputs, eqn)``; jax 0.12 calls DCE rules with a third argument, so every
lowering of a ``triton_call`` fails there with a TypeError. The rule keeps every input of the
call whatever is asked (a kernel launch is not split), so a rule accepting and ignoring extra
arguments is exactly equivalent. It replaces the registered rule when that rule cannot take
three arguments (on jax <= 0.11 the replacement is called with two and returns the same).
"""

from __future__ import annotations

import inspect

__all__ = ["patched", "keep_every_input"]


def keep_every_input(used_outputs, eqn, *_):
    """DCE rule of a kernel launch: every input stays, the equation stays."""
    return [True] * len(eqn.invars), eqn


def _takes(rule, n_args: int) -> bool:
    try:
        inspect.signature(rule).bind(*range(n_args))
    except TypeError:
        return False
    return True


def patched():
    """Import jax_triton and make its DCE rule take what this jax passes. Returns the module."""
    import jax_triton
    from jax._src.interpreters import partial_eval as pe
    from jax_triton import triton_lib

    prim = triton_lib.triton_kernel_call_p
    rule = pe.dce_rules.get(prim)
    if rule is not None and not _takes(rule, 3):
        pe.dce_rules[prim] = keep_every_input
    return jax_triton
