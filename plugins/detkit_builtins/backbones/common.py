"""What the built-in backbones share: freezing and locally supplied ImageNet weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from detkit.errors import ConfigError
from detkit.interfaces import Backbone, freeze_batchnorm


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Stop gradients for every parameter of ``modules``."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


class _FrozenBNMixin:
    """``freeze_bn()`` that survives ``model.train()``.

    ``nn.Module.train`` puts every BatchNorm back into batch-statistics mode,
    so the frozen state is remembered and re-applied after it.
    """

    _frozen_bn: bool = False
    _freeze_bn_affine: bool = True

    def freeze_bn(self, freeze_affine: bool = True) -> None:
        self._frozen_bn, self._freeze_bn_affine = True, freeze_affine
        freeze_batchnorm(self, freeze_affine)  # type: ignore[arg-type]

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self._frozen_bn:
            freeze_batchnorm(self, self._freeze_bn_affine)  # type: ignore[arg-type]
        return self


class TailSequential(_FrozenBNMixin, nn.Sequential):
    """The RoI tail of a backbone: ``[R, C, s, s] -> [R, out_features]``.

    An ``nn.Sequential`` (so its layers keep the reference checkpoint's
    indices) that flattens its input first when ``flatten_input`` is set and
    always flattens its output.  The tail is owned by the RoI head (its
    parameters live under ``head.classifier``), so it keeps its own frozen-BN
    state instead of relying on the backbone's ``train()``.
    """

    def __init__(self, *layers: nn.Module, flatten_input: bool = False):
        super().__init__(*layers)
        self.flatten_input = flatten_input
        self.channels_last = False  # set by a detector that runs in channels-last layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten_input:
            x = x.flatten(1)  # flatten follows the logical (C, H, W) order in any layout
        elif self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x).flatten(1)


class FreezableBNBackbone(_FrozenBNMixin, Backbone):
    """A backbone with a persistent ``freeze_bn()`` and an RoI tail it does not own.

    The tail is kept out of the backbone's submodules: the RoI head registers
    it, so its weights appear once in the detector's state dict (as
    ``head.classifier.*``, the layout of imported checkpoints).
    ``freeze_bn`` reaches the tail too.
    """

    def _set_tail(self, tail: TailSequential) -> None:
        object.__setattr__(self, "_tail", tail)  # deliberately not registered

    def freeze_bn(self, freeze_affine: bool = True) -> None:
        super().freeze_bn(freeze_affine)
        tail = self.__dict__.get("_tail")
        if tail is not None:
            tail.freeze_bn(freeze_affine)


def resolve_pretrained(pretrained: str | bool | None, filename: str, backbone: str) -> Path | None:
    """The local file of ImageNet weights that ``pretrained`` asks for, or ``None``.

    ``pretrained`` is a path, or ``True`` for torchvision's cache
    (``$TORCH_HOME/hub/checkpoints/<filename>``).  Nothing is ever downloaded:
    the weights are hundreds of MB and the machines this runs on may be offline.
    """
    if pretrained is None or pretrained is False:
        return None
    field = "model.backbone.pretrained"
    if pretrained is True:
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if path.is_file():
            return path
        raise ConfigError(
            f"{field}: true needs {path}, which is not there and detkit does not download weights; "
            f"put the file there or give its path, e.g. `{field}: /path/to/{filename}`"
        )
    path = Path(os.path.expanduser(str(pretrained)))
    if not path.is_file():
        raise ConfigError(
            f"{field}: {path} not found; the {backbone} ImageNet weights cannot be downloaded here, "
            f"supply the torchvision file, e.g. `{field}: /path/to/{filename}`"
        )
    return path


def load_torchvision_weights(net: nn.Module, path: Path, backbone: str) -> None:
    """Load a torchvision-format state dict into ``net`` (a torchvision model), strictly."""
    from detkit.io import load_file, load_model_state

    state = load_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.backbone.pretrained: {path} does not hold a state dict")
    load_model_state(net, state, f"{path} ({backbone} ImageNet weights)")


def build_torchvision(make: Callable[[], nn.Module], path: Path | None, backbone: str) -> nn.Module:
    """``make()`` a torchvision model, with the weights of ``path`` when given.

    With weights, the model is built on the meta device and materialised
    uninitialised: random initialisation of VGG16's 138 M parameters takes
    seconds and the strict load overwrites every tensor anyway.
    """
    if path is None:
        return make()
    with torch.device("meta"):
        net = make()
    net = net.to_empty(device="cpu")
    load_torchvision_weights(net, path, backbone)
    return net
