"""Skipped updates: a step with a non-finite loss or gradient norm leaves the weights alone.

The train step itself refuses the update (`train.step`); this class does the host side. It
reads each step's two flags one step late — after the next step is dispatched — so checking
costs no host-device sync in the loop. Each skipped step is printed and logged to
metrics.jsonl (`skipped_update`, `loss_finite`, `grad_finite`); `limit` skips in a row raise
`NonFiniteError` naming the step, the last step whose update was applied and the newest
checkpoint at or before it.
"""

from __future__ import annotations

import jax

__all__ = ["NonFiniteError", "SkippedUpdates"]


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates: the run cannot make progress."""


class SkippedUpdates:
    def __init__(self, limit: int, ckpt, metrics, say, start_step: int):
        self.limit, self.ckpt, self.metrics, self.say = int(limit), ckpt, metrics, say
        self.streak, self.last_good, self.total = 0, int(start_step), 0
        self._pending = None

    def observe(self, step: int, out: dict) -> None:
        """Record `step`'s outputs; check the previous step's."""
        previous, self._pending = self._pending, (step, {k: out[k] for k in
                                                         ("loss_finite", "grad_finite", "loss",
                                                          "grad_norm")})
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._check(*previous)

    def _check(self, step: int, out: dict) -> None:
        out = jax.device_get(out)
        loss_ok, grad_ok = bool(out["loss_finite"]), bool(out["grad_finite"])
        if loss_ok and grad_ok:
            self.streak, self.last_good = 0, step
            return
        self.streak += 1
        self.total += 1
        bad = [f"{name} {float(out[name])}" for name, ok in (("loss", loss_ok),
                                                              ("grad_norm", grad_ok)) if not ok]
        self.say(f"step {step}: update skipped, non-finite {' and '.join(bad)} "
                 f"({self.streak} in a row; the run stops at {self.limit})", flush=True)
        self.metrics.write(step, {"skipped_update": 1.0, "loss_finite": float(loss_ok),
                                  "grad_finite": float(grad_ok)})
        if self.streak >= self.limit:
            good = [s for s in self.ckpt.all_steps() if s <= self.last_good]
            where = (str(self.ckpt.directory / str(good[-1])) if good
                     else "none (no checkpoint before the first skipped step)")
            raise NonFiniteError(
                f"step {step}: {self.streak} updates in a row skipped for a non-finite "
                f"{' / '.join(n.split()[0] for n in bad)} (train.max_skipped_steps="
                f"{self.limit}); the weights are those after step {self.last_good}; last good "
                f"checkpoint: {where}; lower train.lr or lengthen train.warmup_steps")
