"""Export a detector's whole inference path to ONNX or TorchScript.

The exported graph takes one image, ``uint8 [3, H, W]`` RGB (channels first,
any height and width), and returns ``boxes float32 [K, 4]`` (x1, y1, x2, y2 in
the image's own pixels), ``scores float32 [K]`` and ``labels int64 [K]``
(0..C-1), best first: the same detections as ``model.eval(); model([image])``.
Resizing, normalisation, proposals, the RoI head, box decoding and per-class
NMS are all inside the graph.

:class:`ExportableDetector` composes the detector's own pieces (``forward``
and ``detections``); only the resize is new code, because ``predict``'s
resizers (PIL, torch's uint8 kernel) do not trace: :mod:`detkit.resize`
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

from detkit.errors import DetkitError
from detkit.resize import as_f64, resize_uint8

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


class ExportError(DetkitError):
    """The model cannot be exported as asked (format, missing package, untraceable model)."""


class ExportableDetector(nn.Module):
    """``image uint8 [3, H, W]`` -> ``(boxes [K, 4], scores [K], labels [K])``: the detector's own eval forward.

    Only unpacks the one image's detection dict into a tuple (graph outputs);
    preprocessing, proposals, the RoI head and post-processing are the
    detector's forward, traced.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.model([image])[0]
        return detections["boxes"], detections["scores"], detections["labels"]


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
    out.parent.mkdir(parents=True, exist_ok=True)
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
        model.eval()
        with torch.inference_mode():
            expected = model([image])[0]
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
