"""The loss guard (``train.loss_guard``): :class:`NonFiniteLossHook`, priority 30.

One of the built-in training hooks listed in :mod:`detkit.engine.hooks` (which
re-exports it): stops a run whose loss became inf/NaN or diverged.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from detkit.errors import DetkitError
from detkit.interfaces import Hook
from detkit.sections import LossGuardConfig


class NonFiniteLossHook(Hook):
    """Stops training with one clear line when the logged loss is inf/NaN, or diverges.

    Checked at each log point on the window's mean losses (one host sync per
    window, shared with :class:`~detkit.engine.hooks.LoggingHook`), and before every iteration
    checkpoint, so a diverged model never replaces the last good ``last.pt``.
    ``max_loss`` stops when the total exceeds it, from the first log point (so
    also in runs shorter than ``history``); ``max_ratio`` stops when it
    exceeds that many times the median of the previous ``history`` log points
    (after ``history`` of them): ``train.loss_guard``.
    """

    priority = 30

    def __init__(self, guard: LossGuardConfig, checkpoint_every_iters: int | None):
        self.max_loss, self.max_ratio, self.history = guard.max_loss, guard.max_ratio, guard.history
        self.checkpoint_every_iters = checkpoint_every_iters  # checked before each iteration checkpoint too
        self.totals: list[float] = []

    def _fail(self, why: str) -> None:
        loop = self.loop
        saved, run_dir = getattr(loop, "saved_step", None), getattr(loop, "run_dir", None)
        kept = (f"; {run_dir / 'last.pt'} keeps step {saved}, the last before it"
                if saved is not None and run_dir is not None and (run_dir / "last.pt").exists() else "")
        raise DetkitError(
            f"{why} at step {loop.step}: lower train.optimizer.lr, set train.trainer.grad_clip, "
            f"or check the data (see `detkit data stats`){kept}"
        )

    def after_step(self) -> None:
        loop = self.loop
        every = self.checkpoint_every_iters
        log_point = loop.log_now()
        if not (log_point or (every and loop.step % every == 0)):
            return
        values = loop.window.mean()
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self._fail(f"loss became {values[bad[-1]]} ({', '.join(bad)})")
        total = values.get("total")
        if total is None:
            return
        # The ratio first: where both trip, the jump from the recent losses says more.
        if self.max_ratio is not None and len(self.totals) >= self.history:
            median = statistics.median(self.totals[-self.history:])
            if median > 0 and total > self.max_ratio * median:
                self._fail(f"loss {total:.4g} is over {self.max_ratio:g}x the recent median {median:.4g} "
                           "(train.loss_guard.max_ratio)")
        if self.max_loss is not None and total > self.max_loss:  # from the first log point
            self._fail(f"loss {total:.4g} exceeded train.loss_guard.max_loss {self.max_loss:g}")
        if log_point:
            self.totals = (self.totals + [total])[-self.history:]

    def state_dict(self) -> dict[str, Any]:
        return {"totals": list(self.totals)} if self.totals else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = [float(v) for v in state.get("totals", [])]
