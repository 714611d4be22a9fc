"""The optimisation step: autocast forward to the detector's losses, weighted total, scaled backward, clip, step."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable, Iterator, Mapping, Sequence, Sized

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from detkit.amp import Amp
from detkit.errors import ConfigError
from detkit.interfaces import Targets, Trainer


class FasterRCNNTrainer(Trainer):
    """One optimizer step of a detector, as detectron2's ``AMPTrainer.run_step`` (kind ``trainer``).

    :meth:`run_step` over ``k`` micro-batches (gradient accumulation; one for
    :meth:`train_step`): zero the gradients; per micro-batch, the forward pass
    under autocast (``amp``) to the detector's named losses, ``total`` =
    their sum weighted by ``loss_weights`` (1 for a name not listed), and a
    backward pass of ``total / k`` through the gradient scaler, skipping the
    DDP all-reduce on all but the last micro-batch (``no_sync``); then unscale,
    clip to ``grad_clip`` and step.  Returns the mean of the micro-batches'
    losses, detached, with ``total``.  Nothing here is specific to Faster R-CNN
    except the name: any :class:`~detkit.interfaces.Detector` trains with it.

    ``seed`` fixes the random sampling of anchors and RoIs (one
    ``torch.Generator`` per device, saved in :meth:`state_dict`); ``null``
    draws from torch's global generator.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        loss_weights: dict[str, float] = Field(
            default_factory=dict,
            description="weight of each named loss in total (rpn_loc, rpn_cls, roi_loc, roi_cls, ...); 1 if absent",
        )
        grad_clip: float | None = Field(None, gt=0, description="max total gradient norm; null: no clipping")
        seed: int | None = Field(None, description="seed of the target sampling; null: torch's global RNG")

        @field_validator("loss_weights")
        @classmethod
        def _finite(cls, value: dict[str, float]) -> dict[str, float]:
            bad = {k: v for k, v in value.items() if not (v >= 0 and v != float("inf"))}
            if bad:
                raise ValueError(f"weights must be finite and >= 0, got {bad}")
            return value

    def __init__(
        self,
        params: Params | None = None,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        amp: bool | Amp = False,
    ):
        p = self.params = params if params is not None else self.Params()
        self.model = model
        self.module: nn.Module = model  # the engine puts its DistributedDataParallel wrapper here
        self.optimizer = optimizer
        self.amp = amp if isinstance(amp, Amp) else Amp(_device_of(model), enabled=bool(amp))
        self.grad_clip = p.grad_clip
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._checked_names = False

    def __repr__(self) -> str:
        return f"FasterRCNNTrainer(loss_weights={self.params.loss_weights}, grad_clip={self.grad_clip}, amp={self.amp})"

    # ------------------------------------------------------------- sampling
    def _sampling_generator(self, device: torch.device) -> None:
        """Give the detector's stages the seeded generator (on the device the model is on now)."""
        if self.params.seed is None:
            return
        if self._generator is None or self._generator.device != device:
            g = torch.Generator(device=device)
            if self._generator_state is not None:
                g.set_state(self._generator_state)
            else:
                g.manual_seed(self.params.seed)
            self._generator = g
            self.model.set_sampling_generator(g)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scaler": self.amp.state_dict()}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.amp.load_state_dict(state.get("scaler") or {})
        if state.get("generator") is not None:
            self._generator_state = state["generator"].cpu()
            self._generator = None  # rebuilt from the state on the next step's device

    # ---------------------------------------------------------------- step
    def losses(self, images: Sequence[Tensor], targets: Targets) -> dict[str, Tensor]:
        """The forward pass (through ``module``, under autocast): the named losses and their weighted ``total``."""
        with self.amp.autocast():
            losses = dict(self.module(images, targets))
        if not self._checked_names:
            unknown = sorted(set(self.params.loss_weights) - set(losses))
            if unknown:
                raise ConfigError(
                    f"train.trainer.loss_weights: {', '.join(unknown)} is not a loss of this model "
                    f"(it returns {', '.join(losses)})"
                )
            self._checked_names = True
        weights = self.params.loss_weights
        total = sum(loss.float() * weights.get(name, 1.0) for name, loss in losses.items())
        losses["total"] = total
        return losses

    def run_step(self, micro_batches: Iterable[tuple[Sequence[Tensor], Targets]]) -> dict[str, Tensor]:
        if self.optimizer is None:
            raise RuntimeError("FasterRCNNTrainer.run_step needs an optimizer; build it with optimizer=...")
        if not isinstance(micro_batches, Sized):
            micro_batches = list(micro_batches)
        k = len(micro_batches)
        if k == 0:
            raise ValueError("run_step got no micro-batches")
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        no_sync = getattr(self.module, "no_sync", None)  # DistributedDataParallel's
        for i, ((images, targets), last) in enumerate(_with_last(iter(micro_batches))):
            if i == 0 and images:
                self._sampling_generator(_device_of(self.model))
            with nullcontext() if last or no_sync is None else no_sync():
                losses = self.losses(images, targets)
                # Accumulated gradients are the mean over the micro-batches: each backward sees total / k.
                self.amp.backward(losses["total"] * (1.0 / k) if k > 1 else losses["total"])
            for name, value in losses.items():
                value = value.detach()
                sums[name] = sums[name] + value if name in sums else value
        if self.grad_clip is not None:
            self.amp.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            params = [q for g in self.optimizer.param_groups for q in g["params"] if q.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.amp.step(self.optimizer)
        return {name: value / k if k > 1 else value for name, value in sums.items()}


def _with_last(it: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs, looking one item ahead (so at most two micro-batches are held)."""
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
