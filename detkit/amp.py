"""Mixed precision, owned in one place: the autocast context and the gradient scaler.

``train.amp: true`` turns it on.  On CUDA the network runs in float16 under
``torch.autocast`` and a ``torch.amp.GradScaler`` scales the loss so small
gradients do not flush to zero; on the CPU autocast uses bfloat16 (no float16
kernels there, and bfloat16's float32 range needs no scaler).  Everything that
touches precision (the trainer's forward, backward, unscaling before gradient
clipping, the optimizer step, the scaler's state in checkpoints) goes through
one :class:`Amp` object.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor


class Amp:
    """Autocast + gradient scaler for one device.

    ``Amp(device, enabled=False)`` is a no-op wrapper (plain float32), so code
    can always go through it.  ``scaler`` replaces the default scaler (a CUDA
    ``GradScaler`` enabled with ``enabled`` on CUDA), e.g. a CPU scaler in tests.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        enabled: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.device_type = torch.device(device).type
        self.enabled = bool(enabled)
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        if scaler is None:
            scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.device_type == "cuda")
        self.scaler = scaler
        self._unscaled = False

    def __repr__(self) -> str:
        return f"Amp({self.device_type}, enabled={self.enabled}, dtype={self.dtype}, scaler={self.scaling})"

    @property
    def scaling(self) -> bool:
        """Whether losses are scaled (a scaler is enabled)."""
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        """The forward pass's context: reduced precision where safe, when enabled."""
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, through the scaler when one is enabled."""
        (self.scaler.scale(loss) if self.scaling else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping them); at most once per step."""
        if self.scaling and not self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step the optimizer; with a scaler, skip a step whose gradients hold inf/NaN."""
        if self.scaling:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self._unscaled = False

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
