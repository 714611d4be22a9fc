"""What the built-in backbones share: normalisation, initialisation, freezing and local ImageNet weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor, nn

from detkit.errors import ConfigError
from detkit.interfaces import Backbone, freeze_batchnorm


Norm = Literal["frozen_bn", "bn", "sync_bn", "gn"]

NORM_DESCRIPTION = (
    "normalisation layers: frozen_bn (BatchNorm with fixed statistics and affine weights: for "
    "pretrained weights and small batches), bn (trainable BatchNorm, per-device batch statistics), "
    "sync_bn (BatchNorm with statistics over all GPUs of a distributed run; on one process it is bn), "
    "gn (GroupNorm, 32 groups: independent of the batch size, the choice for training from scratch)"
)

GN_GROUPS = 32


def gn_groups(channels: int, groups: int = GN_GROUPS) -> int:
    """``groups`` when it divides ``channels``, else the largest divisor below it (16 channels -> 16)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    """A ``channels -> module`` factory for ``norm`` (``frozen_bn`` builds BatchNorm; freeze it after)."""
    if norm in ("frozen_bn", "bn"):
        return nn.BatchNorm2d
    if norm == "sync_bn":
        return nn.SyncBatchNorm
    if norm == "gn":
        return lambda channels: nn.GroupNorm(gn_groups(channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected frozen_bn, bn, sync_bn or gn")


def legacy_freeze_bn(data: Any, default_norm: Norm) -> Any:
    """Map the old ``freeze_bn: true/false`` to ``norm: frozen_bn/<default_norm>`` (a ``before`` validator)."""
    if isinstance(data, dict) and "freeze_bn" in data:
        data = dict(data)
        freeze = data.pop("freeze_bn")
        if "norm" in data:
            raise ValueError("freeze_bn is the old spelling of norm: frozen_bn; give only norm")
        data["norm"] = "frozen_bn" if freeze else ("bn" if default_norm == "frozen_bn" else default_norm)
    return data


def init_weights(module: nn.Module) -> None:
    """Initialise as the reference detectors do for training from scratch.

    Convolutions: He (Kaiming) normal with ``fan_out``, zero bias; normalisation
    layers: weight 1, bias 0; fully connected layers that feed a ReLU: He
    uniform with ``a=1`` (Caffe2's "MSRA-Xavier" fill), zero bias.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)


def check_pretrained_norm(pretrained: str | bool | None, norm: Norm, backbone: str) -> None:
    """ImageNet files hold BatchNorm statistics: GroupNorm layers cannot take them."""
    if pretrained not in (None, False) and norm == "gn":
        raise ConfigError(
            f"model.backbone.norm: gn cannot load the BatchNorm ImageNet weights of {backbone} "
            "(model.backbone.pretrained); use norm: frozen_bn, bn or sync_bn with them, or gn from scratch"
        )


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Stop gradients for every parameter of ``modules``."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def stage_outputs(x: Tensor, stages: Iterable[tuple[str, nn.Module]], wanted: list[str]) -> dict[str, Tensor]:
    """Run named ``stages`` in order on ``x`` and return the outputs named in ``wanted``.

    Stops after the last wanted stage: later stages feed no requested output.
    """
    out: dict[str, Tensor] = {}
    for name, stage in stages:
        x = stage(x)
        if name in wanted:
            out[name] = x
            if len(out) == len(wanted):
                break
    return out


class FrozenBNMixin:
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


class TailSequential(FrozenBNMixin, nn.Sequential):
    """The RoI tail of a backbone: ``[R, C, s, s] -> [R, out_features]``.

    An ``nn.Sequential`` (so its layers keep the reference checkpoint's
    indices) that flattens its input first when ``flatten_input`` is set and
    always flattens its output.  The tail is owned by the RoI head (its
    parameters live under ``roi_head.box_head.tail``), so it keeps its own frozen-BN
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


class FreezableBNBackbone(FrozenBNMixin, Backbone):
    """A backbone with a persistent ``freeze_bn()`` and an RoI tail it does not own.

    The tail is kept out of the backbone's submodules: the RoI head registers
    it, so its weights appear once in the detector's state dict (as
    ``roi_head.box_head.tail.*``).
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
    (``$TORCH_HOME/hub/checkpoints/<filename>``), fetched there through
    torchvision's weights API (with its progress bar) when missing; offline,
    one line names the file and where to put it.  A path is never downloaded.
    """
    if pretrained is None or pretrained is False:
        return None
    field = "model.backbone.pretrained"
    if pretrained is True:
        from detkit import hub
        from detkit.errors import CheckpointError

        path = hub.cache_dir() / filename
        if path.is_file():
            return path
        entry = hub.weights_by_file(filename)
        if entry is None:
            raise ConfigError(f"{field}: true needs {path}; put the file there or give its path")
        try:
            return hub.fetch(entry, f"the {backbone} ImageNet weights")
        except CheckpointError as exc:
            raise ConfigError(f"{field}: true: {exc}") from None
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


class _BNFoldedConv2d(nn.Conv2d):
    """A conv whose following BatchNorm, when in eval mode, is applied through the conv's weights.

    ``bn(conv(x)) = conv(x, w * s) + (beta - mean * s)`` with
    ``s = gamma / sqrt(var + eps)``: one pass over the activations instead of
    two (forward and backward), the same function and gradients up to float
    rounding.  A BatchNorm in training mode (batch statistics) runs as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_folded_bn"]
        if bn.training:
            return self._conv_forward(x, self.weight, self.bias)
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale.reshape(-1, 1, 1, 1), shift)


class _FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d applied by the conv before it (:class:`_BNFoldedConv2d`) while in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training else x


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` into the conv that feeds it; returns the pairs linked.

    Pairs are a conv directly followed by a BatchNorm in an ``nn.Sequential``,
    and ``convK``/``bnK`` children of other modules (torchvision's residual
    blocks).  Only the classes change: parameters, buffers and state-dict keys
    stay as they are.
    """
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for m in module.modules():
        kids = list(m.named_children())
        if isinstance(m, nn.Sequential):
            pairs += [(a, b) for (_, a), (_, b) in zip(kids, kids[1:])]
        else:
            named = dict(kids)
            pairs += [(c, named[f"bn{n[4:]}"]) for n, c in kids if n.startswith("conv") and f"bn{n[4:]}" in named]
    linked = 0
    for conv, bn in pairs:
        if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
                and conv.out_channels == bn.num_features and conv.padding_mode == "zeros"):
            conv.__class__, bn.__class__ = _BNFoldedConv2d, _FoldedBatchNorm2d
            conv.__dict__["_folded_bn"] = bn  # a plain reference: not a submodule, not in the state dict
            linked += 1
    return linked
