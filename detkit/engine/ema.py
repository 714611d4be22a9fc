"""The moving average of the weights (``train.ema``): :class:`EMAHook`, priority 20.

One of the built-in training hooks listed in :mod:`detkit.engine.hooks` (which
re-exports it); registered as the hook ``ema``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from detkit.interfaces import Hook
from detkit.sections import EMAConfig


class EMAHook(Hook):
    """An exponential moving average of the weights, used for evaluation and saved as the model.

    After each optimizer step every floating-point entry of the model's state
    (parameters and BatchNorm statistics) moves towards the trained value:
    ``ema = d * ema + (1 - d) * w`` with ``d = decay * (1 - exp(-updates / tau))``
    (a warm-up: early averages forget the random initialisation quickly;
    ``tau: 0`` keeps ``d = decay``).  Evaluation and the checkpoints' ``model``
    use the averaged weights, as in Ultralytics/timm; the trained weights are
    kept in the checkpoint's hook state, so a resumed run continues exactly.
    """

    Params = EMAConfig
    priority = 20

    def __init__(self, params: EMAConfig | None = None):
        p = params if params is not None else self.Params()
        self.decay, self.tau = p.decay, p.tau
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None
        self._swapped: dict[str, torch.Tensor] | None = None  # trained weights while the EMA is in the model
        self._pairs: tuple[list[torch.Tensor], ...] | None = None

    @property
    def name(self) -> str:
        return "ema"

    def _state(self) -> dict[str, torch.Tensor]:
        return self.loop.model.state_dict()

    def before_train(self) -> None:
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in self._state().items()}
        self._pairs = None

    def _tensor_pairs(self) -> tuple[list[torch.Tensor], ...]:
        """(average, model) tensors, floating-point and other, listed once: the model's
        state tensors share storage with its parameters and buffers, which stay put."""
        if self._pairs is None:
            state = self._state()
            floats = [k for k, v in state.items() if v.is_floating_point()]
            others = [k for k, v in state.items() if not v.is_floating_point()]
            self._pairs = ([self.shadow[k] for k in floats], [state[k].detach() for k in floats],
                           [self.shadow[k] for k in others], [state[k] for k in others])
        return self._pairs

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau)) if self.tau else self.decay

    @torch.no_grad()
    def after_step(self) -> None:
        self.updates += 1
        d = self.current_decay()
        ema_f, model_f, ema_o, model_o = self._tensor_pairs()
        torch._foreach_lerp_(ema_f, model_f, 1.0 - d)
        for e, m in zip(ema_o, model_o):
            e.copy_(m)

    @contextmanager
    def eval_weights(self) -> Iterator[None]:
        if self.shadow is None or self._swapped is not None:
            yield
            return
        model = self.loop.model
        self._swapped = {k: v.detach().clone() for k, v in self._state().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(self._swapped)
            self._swapped = None

    def state_dict(self) -> dict[str, Any]:
        # Saved while the EMA is swapped in (checkpoint "model" = EMA): keep the trained weights here.
        if self._swapped is not None:
            return {"updates": self.updates, "in_model": "ema", "weights": self._swapped}
        return {"updates": self.updates, "in_model": "train", "weights": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        self._pairs = None
        if state.get("in_model") == "ema":
            # The checkpoint's model (already loaded) is the average; the trained weights come from here.
            self.shadow = {k: v.detach().clone() for k, v in self._state().items()}
            self.loop.model.load_state_dict(state["weights"])
        else:
            self.shadow = {k: v.detach().clone() for k, v in state["weights"].items()}
