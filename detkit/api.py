"""The Python API: the same operations as the command line, as functions.

::

    import detkit

    model = detkit.load("runs/quickstart/best.pt")        # device="auto"
    dets = model.predict("street.jpg")                     # or a list of images
    dets[0].boxes, dets[0].scores, dets[0].labels, dets[0].names

    run_dir = detkit.train("configs/quickstart.yaml", overrides=["train.epochs=1"])
    result = detkit.evaluate(run_dir / "best.pt", overrides=["eval.metric=coco"])

``detkit train``, ``detkit eval`` and ``detkit predict`` call these functions.
Errors a user can cause are :class:`detkit.errors.DetkitError` subclasses with
a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from detkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from detkit.config import Config

ImageLike = Union[str, os.PathLike, "PILImage.Image", "np.ndarray", Tensor]
"""One image: a file path, a PIL image, a numpy ``[H, W, 3]`` uint8 array, or a
``[3, H, W]`` tensor (uint8 0..255 or float 0..1).  Files and PIL images are read
as they look (EXIF orientation applied, 16-bit scaled to 8: see
:mod:`detkit.data.image`); arrays and tensors are taken as they are."""

__all__ = ["DEFAULT_BATCH_SIZE", "Detections", "ImageLike", "Predictor", "batch_groups", "evaluate", "load",
           "predict_files", "to_image_tensor", "train"]


@dataclass(frozen=True)
class Detections:
    """The objects found in one image; tensors on the model's device.

    boxes: float32 ``[K, 4]`` ``(x1, y1, x2, y2)`` in the original image's pixels;
    scores: float32 ``[K]``; labels: int64 ``[K]`` in ``0..C-1``; names: the
    ``K`` class names; image_size: ``(height, width)``; source: the file the
    image came from, if it came from a file.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]
    source: str | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def cpu(self) -> "Detections":
        return Detections(self.boxes.cpu(), self.scores.cpu(), self.labels.cpu(), list(self.names),
                          self.image_size, self.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"image", "width", "height", "detections": [{"box", "score", "label", "name"}]}``."""
        boxes, scores, labels = self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()
        return {
            "image": self.source,
            "width": self.image_size[1],
            "height": self.image_size[0],
            "detections": [
                {"box": b, "score": s, "label": l, "name": n}  # full precision, as the model gave them
                for b, s, l, n in zip(boxes, scores, labels, self.names)
            ],
        }


def _describe(image: Any) -> str:
    return f"{type(image).__module__}.{type(image).__qualname__}"


def to_image_tensor(image: Any, where: str = "image") -> Tensor:
    """One :data:`ImageLike` as a ``[3, H, W]`` tensor (uint8, or float in 0..1).

    ``where`` names the input in error messages.
    """
    if isinstance(image, (str, os.PathLike)):
        from detkit.data.image import read_image_uint8

        return read_image_uint8(image)
    if isinstance(image, Tensor):
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise DataError(f"{where}: a tensor image must be [3, H, W] (channels first), got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return image
        if not image.is_floating_point():
            raise DataError(f"{where}: a tensor image must be uint8 (0..255) or float (0..1), got {image.dtype}")
        if image.numel() and bool(image.amax() > 1.0 + 1e-3):
            raise DataError(f"{where}: a float tensor image must hold values in 0..1 (max is {float(image.amax()):.4g});"
                            " divide by 255 or pass uint8")
        return image
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"{where}: a numpy image must be uint8 [H, W, 3], got dtype {image.dtype}"
                            " (pass a float tensor [3, H, W] in 0..1 instead)")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise DataError(f"{where}: a numpy image must be [H, W, 3] (channels last), got shape {image.shape}")
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        from detkit.data.image import pil_to_uint8

        return pil_to_uint8(image, where)  # as a file is read: EXIF orientation, 16-bit scaled
    raise DataError(
        f"{where}: expected a file path, PIL.Image, numpy uint8 [H, W, 3] array or [3, H, W] tensor, "
        f"got {_describe(image)}"
    )


def _as_list(images: Any) -> tuple[list[Any], bool]:
    """``(items, was_a_list)``; an ``[N, 3, H, W]`` tensor is N images."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images.unbind(0)), True
    return [images], False


DEFAULT_BATCH_SIZE = 8
"""Images per forward pass when :meth:`Predictor.predict` is given a list."""


def batch_groups(module: nn.Module, sizes: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices into ``sizes`` (``(h, w)`` per image), as forward passes of at most ``batch_size``.

    One pass holds only images whose network input, padded to the
    preprocessor's ``size_divisible``, has the same size: the batch is then
    padded to exactly what each image is padded to alone, so batching changes
    no pixel the network sees.  Passes are in order of each group's first image.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(module.preprocess.padded_size(int(h), int(w)), []).append(i)
    return [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


class Predictor:
    """A trained detector ready to predict: the module, its class names and its device.

    Made by :func:`load`.  ``module`` is the detector (a
    :class:`detkit.interfaces.Detector`, in eval mode): ``predict`` runs its
    forward, the same one training evaluated and export traces.
    """

    def __init__(self, module: nn.Module, classes: Sequence[str], config: Mapping[str, Any],
                 device: torch.device, checkpoint: str | None = None):
        self.module = module
        self.classes = list(classes)
        self.config = dict(config)
        self.device = device
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        return (f"Predictor({self.config.get('model', {}).get('type', '?')}, {len(self.classes)} classes, "
                f"device={self.device}, checkpoint={self.checkpoint!r})")

    def to(self, device: str | torch.device) -> "Predictor":
        """Move to ``device`` (``auto``, ``cpu``, ``cuda:1``...); returns self."""
        from detkit.engine.device import resolve_device

        self.device = resolve_device(str(device), "device")
        self.module.to(self.device)
        return self

    @torch.inference_mode()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        score_thresh: float | None = None,
        nms_iou: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_detections: int | None = None,
    ) -> list[Detections]:
        """Detect objects; always returns a list, one :class:`Detections` per image, in input order.

        ``images``: one :data:`ImageLike` or a list of them (an ``[N, 3, H, W]``
        tensor counts as N images).  ``score_thresh``/``nms_iou``/``max_detections``
        (detections kept per image, best first) default to the model's.

        A list runs in forward passes of up to ``batch_size`` images, each pass
        holding only images that share a padded network-input size (see
        :func:`batch_groups`): no image is padded more than alone, so every
        image gets the detections a one-image call gives, up to float rounding
        (a batched convolution may sum in another order, so detections whose
        scores tie to rounding may swap places).  Images of other sizes go in
        other passes; ``batch_size=1`` runs one image per pass.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if max_detections is not None and max_detections < 1:
            raise ConfigError(f"max_detections must be at least 1, got {max_detections}")
        items, _ = _as_list(images)
        out: list[Detections | None] = [None] * len(items)
        self.module.eval()
        # Images are read a window at a time, so a long list of files is never all in memory.
        window = batch_size * 4
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            tensors = [to_image_tensor(x, f"image {start + i}" if len(items) > 1 else "image")
                       for i, x in enumerate(chunk)]
            for group in batch_groups(self.module, [t.shape[-2:] for t in tensors], batch_size):
                with self.module.detection_settings(score_thresh=score_thresh, nms_iou=nms_iou,
                                                    max_detections=max_detections):
                    preds = self.module([tensors[i].to(self.device) for i in group])
                for i, pred in zip(group, preds):
                    item, labels = chunk[i], pred["labels"]
                    out[start + i] = Detections(
                        boxes=pred["boxes"], scores=pred["scores"], labels=labels,
                        names=[self.classes[k] for k in labels.tolist()],
                        image_size=(int(tensors[i].shape[-2]), int(tensors[i].shape[-1])),
                        source=str(item) if isinstance(item, (str, os.PathLike)) else None,
                    )  # fmt: skip
        return out  # type: ignore[return-value]

    __call__ = predict


def load(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> Predictor:
    """A :class:`Predictor` from a detkit checkpoint (``best.pt``, ``last.pt``, an import).

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
    """
    from detkit.engine.checkpoint import load_detector
    from detkit.engine.device import resolve_device

    dev = resolve_device(str(device), "device")
    module, ckpt = load_detector(checkpoint, map_location="cpu")
    module.to(dev)
    return Predictor(module, ckpt["classes"], ckpt["config"], dev, str(checkpoint))


def _config(config: str | os.PathLike | Mapping[str, Any] | "Config", overrides: Sequence[str]) -> tuple["Config", Path | None]:
    from detkit.config import Config, apply_overrides, load_config, validate

    if isinstance(config, Config):
        return (validate(apply_overrides(config.to_dict(), overrides), "<config>") if overrides else config), None
    if isinstance(config, Mapping):
        return validate(apply_overrides(dict(config), overrides), "<config dict>"), None
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides), Path(config)
    raise ConfigError(f"config: expected a file path or a mapping, got {_describe(config)}")


def train(
    config: str | os.PathLike | Mapping[str, Any] | "Config",
    overrides: Sequence[str] = (),
    *,
    resume: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Train as the config says (a YAML path, a mapping or a :class:`detkit.config.Config`); returns the run directory.

    ``overrides``: ``["train.epochs=3", ...]`` as ``--set`` takes them.
    ``resume``: a checkpoint to continue from.  ``out_dir``: the run directory
    (default ``train.out_dir``).  A run directory that already holds
    checkpoints is refused unless ``resume`` or ``overwrite`` is given.
    """
    from detkit.engine.train import train as run_training

    cfg, path = _config(config, overrides)
    return run_training(cfg, config_path=path, resume=Path(resume) if resume is not None else None,
                        out_dir=Path(out_dir) if out_dir is not None else None, overwrite=overwrite)


def evaluate(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Evaluate a checkpoint on the validation split of its config (or of ``config``).

    Returns ``{"metrics": {"voc/mAP": ..., "coco/AP": ...}, "per_class": ...,
    "best_key", "best", "images", "files"}`` and writes ``metrics.json``,
    ``pr_curves.png``, ``confusion_matrix.png`` and ``detections.json`` into
    ``out`` (default ``<checkpoint dir>/eval``).  ``overrides`` such as
    ``["eval.metric=coco"]`` apply to the config used.  Under ``torchrun``
    prediction is sharded over the processes; rank 0 returns the result and
    writes the files, the other ranks return None.
    """
    from detkit.engine.eval_checkpoint import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, config_path=config, overrides=list(overrides), out=out)


def predict_files(
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    **options: Any,
) -> list[dict[str, Any]]:
    """``detkit predict``: one ``<stem>.json`` per image in ``out_dir`` (see :func:`detkit.engine.predict.predict_files`)."""
    from detkit.engine.predict import predict_files as run

    return run(checkpoint, images, out_dir, **options)
