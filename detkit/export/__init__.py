"""Export a detector's whole inference path to ONNX or TorchScript.

The exported graph takes one image, ``uint8 [3, H, W]`` RGB (channels first,
any height and width), and returns ``boxes float32 [K, 4]`` (x1, y1, x2, y2 in
the image's own pixels), ``scores float32 [K]`` and ``labels int64 [K]``
(0..C-1), best first: the same detections as ``model.predict([image])``.
Resizing, normalisation, proposals, the RoI head, box decoding and per-class
NMS are all inside the graph.

:class:`ExportableDetector` composes the detector's own pieces (``forward``
and ``detections``); only the resize is new code, because ``predict``'s
resizers (PIL, torch's uint8 kernel) do not trace: :mod:`detkit.export.resize`
reproduces them exactly with tensor operations.  The graph is recorded by
tracing, so every size inside it is computed by tensor operations and stays
dynamic.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from detkit.errors import DetkitError, OutputError
from detkit.io import check_output_file, make_output_dir
from detkit.export.resize import as_f64, resize_uint8

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


class ExportError(DetkitError):
    """The model cannot be exported as asked (format, missing package, untraceable model)."""


def resized_size(
    height: Tensor, width: Tensor, min_size: int, max_size: int | None, rounding: str = "round"
) -> tuple[Tensor, Tensor]:
    """:func:`detkit.data.transforms.resize_shape` on 0-d int64 sizes, in tensor arithmetic.

    The same IEEE operations in float64 (``round``, ``floor``: Python floats
    are doubles; ``torch.round`` rounds half to even as ``round`` does) or
    integer floor division (``truncate``), so a traced graph gives the sizes
    ``predict`` uses for every image.
    """
    short, long = torch.minimum(height, width), torch.maximum(height, width)
    if rounding == "truncate":
        num, den = torch.full_like(short, min_size), short
        if max_size is not None:
            capped = long * min_size > max_size * short
            num = torch.where(capped, torch.full_like(long, max_size), num)
            den = torch.where(capped, long, den)
        new_h, new_w = height * num // den, width * num // den
    else:
        # [1] float64 vectors, not 0-d: ONNX export computes 0-d arithmetic in float32 (as_f64).
        h, w = as_f64(height), as_f64(width)
        # full_like(...) / x, not number / x: torch computes the latter as reciprocal(x) * number.
        shortf, longf = as_f64(short), as_f64(long)
        scale = torch.full_like(shortf, min_size) / shortf
        if max_size is not None:
            scale = torch.where(longf * scale > max_size, torch.full_like(longf, max_size) / longf, scale)
        step = torch.floor if rounding == "floor" else torch.round
        if rounding not in ("floor", "round"):
            raise ExportError(f"preprocess.rounding {rounding!r} is not exportable")
        new_h, new_w = step(h * scale).to(torch.int64).reshape(()), step(w * scale).to(torch.int64).reshape(())
    return new_h.clamp(min=1), new_w.clamp(min=1)


class ExportableDetector(nn.Module):
    """``image uint8 [3, H, W]`` -> ``(boxes [K, 4], scores [K], labels [K])``, traceable.

    Wraps a detector that has ``preprocess`` (min_size, max_size, resample,
    backend), the multi-mode ``forward`` and ``detections`` (the batched,
    flat post-processing that ``predict`` splits per image).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for attr in ("preprocess", "detections"):
            if not hasattr(model, attr):
                raise ExportError(f"{type(model).__name__} cannot be exported: it has no `{attr}`")
        self.model = model.eval()
        p = model.preprocess
        self.min_size, self.max_size = int(p.min_size), p.max_size
        self.resample, self.backend = p.resample, p.backend
        self.rounding = p.rounding
        unsupported = []
        if p.backend == "torch" and not p.antialias:
            unsupported.append("preprocess.antialias: false (only the antialiased resize is exportable)")
        if p.size_divisible != 1:
            unsupported.append("preprocess.size_divisible > 1")
        if getattr(model, "multi_level", False):
            unsupported.append("multi-level features (a neck such as fpn): their anchors and levels do not trace yet")
        if unsupported:
            raise ExportError(f"{type(model).__name__} cannot be exported with " + "; ".join(unsupported))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = _dim(image, -2), _dim(image, -1)
        new_h, new_w = resized_size(height, width, self.min_size, self.max_size, self.rounding)
        x = resize_uint8(image, new_h, new_w, self.resample, self.backend) / 255.0
        x = x.unsqueeze(0)
        image_sizes = torch.stack((new_h, new_w)).unsqueeze(0)
        orig_sizes = torch.stack((height, width)).unsqueeze(0).to(torch.float32)
        roi_cls_locs, roi_scores, rois, roi_indices = self.model(x, image_sizes=image_sizes, scale=1.0)
        boxes, scores, labels, _ = self.model.detections(
            roi_cls_locs, roi_scores, rois, roi_indices, image_sizes, orig_sizes, 1
        )
        return boxes, scores, labels


def _dim(image: Tensor, dim: int) -> Tensor:
    size = image.shape[dim]
    return size if isinstance(size, Tensor) else torch.tensor(size, dtype=torch.int64)


def example_image(height: int = 96, width: int = 128, seed: int = 0) -> Tensor:
    """A blocky random uint8 image for tracing (blocks give a varied, realistic-ish trace)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, max(height // 8, 1), max(width // 8, 1)), generator=g, dtype=torch.uint8)
    return torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="nearest")[0].to(
        torch.uint8
    )


def export_model(
    model: nn.Module, out: str | Path, format: Format = "onnx", example: Tensor | None = None, opset: int = OPSET
) -> Path:
    """Trace ``model``'s inference path and write it to ``out`` (written to a temporary file, then renamed)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    wrapper = ExportableDetector(model).eval()
    example = example_image() if example is None else example
    tmp = out.with_name(f".{out.name}.tmp")
    check_output_file(out)
    make_output_dir(out.parent, given=out)
    try:
        tmp.write_bytes(b"")  # a place we cannot write fails here, with its reason, not inside the exporter
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python value it records; the graph is checked by the tests.
            warnings.simplefilter("ignore")
            if format == "torchscript":
                traced = torch.jit.trace(wrapper, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp))
            else:
                _require_onnx()
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=INPUT_NAMES,
                    output_names=OUTPUT_NAMES,
                    dynamic_axes={
                        "image": {1: "height", 2: "width"},
                        "boxes": {0: "detections"},
                        "scores": {0: "detections"},
                        "labels": {0: "detections"},
                    },
                )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            'ONNX export needs the `onnx` package: pip install -e ".[export]" (or pip install onnx onnxruntime)'
        ) from exc


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, format: Format = "onnx", check: bool = True
) -> tuple[Path, int | None]:
    """Export a detkit checkpoint's detector (see :func:`export_model`).

    With ``check``, the written file is run on two random images and must
    give ``predict``'s detections (:func:`verify_export`).  Returns the path
    and the number of detections compared (``None`` without a check).
    """
    from detkit.engine.checkpoint import load_detector

    if format not in FORMATS:  # before the (slow) load
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    check_output_file(out)  # before the (slow) load
    model, _ = load_detector(checkpoint)
    path = export_model(model, out, format)
    return path, (verify_export(model, path) if check else None)


def compare_detections(
    got: tuple[Any, Any, Any], expected: dict[str, Tensor], box_tol: float = 1.0, score_tol: float = 1e-3
) -> str | None:
    """``None`` when ``got`` (boxes, scores, labels) matches ``expected`` (a ``predict`` result), else why not.

    Detections are matched one to one per class (order among near-equal
    scores may differ between runtimes): same count, scores within
    ``score_tol`` in rank order, every expected box within ``box_tol`` px of a
    distinct exported box.
    """
    boxes, scores, labels = (torch.as_tensor(_numpy(t)) for t in got)
    e_boxes, e_scores, e_labels = (expected[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    if len(scores) != len(e_scores):
        return f"{len(scores)} detections, predict gives {len(e_scores)}"
    for c in torch.unique(e_labels).tolist():
        mine, theirs = labels == c, e_labels == c
        if int(mine.sum()) != int(theirs.sum()):
            return f"class {c}: {int(mine.sum())} detections, predict gives {int(theirs.sum())}"
        s1, s2 = scores[mine].sort(descending=True).values, e_scores[theirs].sort(descending=True).values
        if (s1 - s2).abs().max() > score_tol:
            return f"class {c}: scores differ by {(s1 - s2).abs().max():.2e}"
        free = torch.ones(int(mine.sum()), dtype=torch.bool)
        for box in e_boxes[theirs]:
            d = (boxes[mine] - box).abs().amax(dim=1).masked_fill(~free, float("inf"))
            j = int(d.argmin())
            if d[j] > box_tol:
                return f"class {c}: no exported box within {box_tol} px of {box.tolist()}"
            free[j] = False
    return None


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def verify_export(model: nn.Module, path: str | Path, sizes: tuple[tuple[int, int], ...] = ((240, 320), (300, 200))) -> int:
    """Run the exported file and ``model.predict`` on random images of ``sizes``; raise ExportError on a mismatch.

    Returns the number of detections compared.
    """
    run = load_exported(path)
    compared = 0
    for i, (h, w) in enumerate(sizes):
        image = example_image(h, w, seed=i)
        expected = model.predict([image])[0]
        problem = compare_detections(run(image), expected)
        if problem is not None:
            raise ExportError(f"{path}: the exported model disagrees with predict on a {h}x{w} image: {problem}")
        compared += len(expected["scores"])
    return compared


def load_exported(path: str | Path, **options: Any):
    """A callable ``image uint8 [3, H, W] -> (boxes, scores, labels)`` for an exported file.

    ONNX files run in onnxruntime (numpy in and out), TorchScript files in torch.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # TorchScript files are zip archives, ONNX files protobuf
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError(
                'running an ONNX file needs onnxruntime: pip install -e ".[export]"'
            ) from exc

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], **options)

        def run(image):
            import numpy as np

            return tuple(session.run(None, {"image": np.asarray(_numpy(image), dtype=np.uint8)}))

        return run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the TorchScript loader
        module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(image):
        with torch.inference_mode():
            return tuple(module(torch.as_tensor(image)))

    return run_torchscript
