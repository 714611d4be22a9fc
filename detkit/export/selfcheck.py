"""The check ``detkit export`` runs on the file it wrote, before the file takes its name.

A check proves something only when detections are compared.  It therefore runs
on images where the model detects something:

1. the first :data:`CHECK_IMAGES` validation images of the checkpoint's own
   config (``data.val``), when that config validates and its images can be
   read; otherwise two random test images (:func:`detkit.export.example_image`);
2. at the model's own ``score_thresh`` (the one baked into the file); when the
   model detects nothing on those images there, at the first lower threshold
   of :data:`LOWER_THRESHOLDS` where it does.  The threshold is a constant in
   the traced graph, so that comparison runs on a copy of the file traced at
   the lower threshold (same weights, same graph otherwise), which is deleted
   afterwards.

A difference is an :class:`~detkit.export.ExportError`; a check that found no
detection even at threshold 0 compared nothing, and says so (the CLI warns).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkit.errors import DetkitError

CHECK_IMAGES = 4
LOWER_THRESHOLDS = (0.3, 0.1, 0.05, 0.01, 0.001, 0.0)


@dataclass
class SelfCheck:
    """What the check compared: ``compared`` detections on ``images`` at ``score_thresh``."""

    compared: int
    images: str
    score_thresh: float | None
    model_score_thresh: float | None

    @property
    def lowered(self) -> bool:
        return self.score_thresh != self.model_score_thresh

    def line(self) -> str:
        """One line for the CLI: what was compared, and at which threshold when it was not the model's."""
        text = f"checked against predict: {self.compared} detections on {self.images}"
        if self.compared and self.lowered:
            text += (f" at score_thresh {self.score_thresh:g} (none at the model's {self.model_score_thresh:g}; "
                     "compared a copy traced at the lower threshold)")
        return text


def _uint8(image: Tensor) -> Tensor:
    """The exported graph's input: ``uint8 [3, H, W]`` (data sets give float 0..1, 8-bit exact)."""
    if image.dtype == torch.uint8:
        return image
    return image.float().mul(255.0).round().clamp(0, 255).to(torch.uint8)


def check_images(config: Any) -> tuple[list[Tensor], str]:
    """``(images, description)``: the checkpoint's validation images when readable, else random test images."""
    from detkit.export import example_image

    reason = "no data.val in the checkpoint's config"
    if isinstance(config, dict) and config.get("data", {}).get("val") is not None:
        try:
            from detkit.config import validate
            from detkit.data.loader import build_dataset

            dataset = build_dataset(validate(config, "checkpoint config").data, "val", augment=False)
            images = []
            for i in range(min(len(dataset), CHECK_IMAGES * 2)):
                try:
                    images.append(_uint8(dataset[i][0]))
                except DetkitError:
                    continue  # an unreadable image: the next one
                if len(images) == CHECK_IMAGES:
                    break
            if images:
                return images, f"{len(images)} validation images (the checkpoint's data.val)"
            reason = "its data.val images cannot be read"
        except DetkitError as exc:
            text = " ".join(str(exc).split())  # one line, however many fields the error names
            reason = f"its data.val cannot be read: {text if len(text) <= 200 else text[:197] + '...'}"
    images = [example_image(240, 320, seed=0), example_image(300, 200, seed=1)]
    return images, f"{len(images)} random test images ({reason})"


def _detections(model: nn.Module, images: list[Tensor]) -> int:
    with torch.inference_mode():
        return sum(len(model([image])[0]["scores"]) for image in images)


def self_check(model: nn.Module, path: Path, format: str, config: Any, name: str | Path) -> SelfCheck:
    """Check the exported ``path`` against ``model`` (see the module docstring); ``name``: the file the user named."""
    from detkit.export import export_model, verify_export

    images, source = check_images(config)
    model.eval()
    own = getattr(model, "score_thresh", None)
    compared = verify_export(model, path, images=images, name=name)
    used = own
    if compared == 0 and own is not None:
        for thresh in (t for t in LOWER_THRESHOLDS if t < own):
            with model.detection_settings(score_thresh=thresh):
                if not _detections(model, images):
                    continue
                copy = path.with_name(f"{path.name}.low")
                try:
                    export_model(model, copy, format, given=name)  # type: ignore[arg-type]
                    compared = verify_export(model, copy, images=images,
                                             name=f"{name} (traced at score_thresh {thresh:g})")
                finally:
                    copy.unlink(missing_ok=True)
            used = thresh
            break
    return SelfCheck(compared, source, used, own)
