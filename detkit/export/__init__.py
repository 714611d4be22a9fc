"""Export a detector's whole inference path to ONNX or TorchScript.

The exported graph takes one image, ``uint8 [3, H, W]`` RGB (channels first,
any height and width), and returns ``boxes float32 [K, 4]`` (x1, y1, x2, y2 in
the image's own pixels), ``scores float32 [K]`` and ``labels int64 [K]``
(0..C-1), best first: the same detections as ``model.eval(); model([image])``.
Resizing, normalisation, proposals, the RoI head, box decoding and per-class
NMS are all inside the graph.

:class:`ExportableDetector` is the detector module itself (``model([image])[0]``),
for every built-in architecture, C4 and FPN.  The graph is recorded by
tracing; the detector's preprocessing computes every size with tensor
operations when traced (:mod:`detkit.resize`), so sizes stay dynamic.  The
post-processing settings (``score_thresh``, ``nms_iou``, ``max_detections``)
in force when exporting are baked into the file.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from detkit.errors import DetkitError, OutputError
from detkit.io import check_output_file, make_output_dir

if TYPE_CHECKING:
    from detkit.export.selfcheck import SelfCheck

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


def example_image(height: int = 96, width: int = 128, seed: int = 0) -> Tensor:
    """A blocky random uint8 image for tracing (blocks give a varied, realistic-ish trace)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, max(height // 8, 1), max(width // 8, 1)), generator=g, dtype=torch.uint8)
    return torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="nearest")[0].to(
        torch.uint8
    )


def export_model(
    model: nn.Module, out: str | Path, format: Format = "onnx", example: Tensor | None = None, opset: int = OPSET,
    given: str | Path | None = None,
) -> Path:
    """Trace ``model``'s inference path and write it to ``out`` (written to a temporary file, then renamed).

    ``given``: the path the user named, for messages, when ``out`` is a staging name beside it.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    shown = Path(given) if given is not None else out
    wrapper = ExportableDetector(model).eval()
    example = example_image() if example is None else example
    tmp = out.with_name(f".{out.name}.tmp")
    check_output_file(shown)
    make_output_dir(out.parent, given=shown)
    try:
        tmp.write_bytes(b"")  # a place we cannot write fails here, with its reason, not inside the exporter
    except OSError as exc:
        raise OutputError(f"--out {shown}: cannot write there ({exc.strerror or exc})") from None
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
) -> tuple[Path, "SelfCheck | None"]:
    """Export a detkit checkpoint's detector (see :func:`export_model`).

    With ``check`` the file is written under a temporary name, checked
    against the eval forward (:func:`detkit.export.selfcheck.self_check`: on
    the checkpoint's validation images, at a lower score threshold when the
    model detects nothing there) and only then renamed to ``out``.  A file that
    disagrees is deleted and ``out`` is left as it was (an ExportError says
    so); ``check=False`` writes the file unchecked.  Returns the path and the
    :class:`~detkit.export.selfcheck.SelfCheck` (``None`` without a check;
    ``compared == 0`` when nothing was compared: the caller should say so
    rather than report a pass).
    """
    from detkit.engine.checkpoint import load_detector
    from detkit.export.selfcheck import self_check

    if format not in FORMATS:  # before the (slow) load
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_file(out)  # before the (slow) load
    model, ckpt = load_detector(checkpoint)
    if not check:
        return export_model(model, out, format), None
    staged = out.with_name(f".{out.name}.unchecked")
    try:
        export_model(model, staged, format, given=out)
        report = self_check(model, staged, format, ckpt.get("config"), name=out)
        staged.replace(out)
    except ExportError as exc:
        if staged.exists():  # written, and it failed its check
            raise ExportError(f"{exc}; {out} not written (--no-check writes the file unchecked)") from None
        raise
    finally:
        staged.unlink(missing_ok=True)
    return out, report


# The contract: the exported file gives the eval forward's detections to these tolerances.
BOX_TOL = 0.01
SCORE_TOL = 1e-4


def compare_detections(
    got: tuple[Any, Any, Any], expected: dict[str, Tensor], box_tol: float = BOX_TOL, score_tol: float = SCORE_TOL
) -> str | None:
    """``None`` when ``got`` (boxes, scores, labels) matches ``expected`` (the eval forward's), else why not.

    Same count, and every expected detection paired with a distinct exported
    one of the same label whose score is within ``score_tol`` and whose box
    is within ``box_tol`` px (the nearest such box); order-free, since the
    order among near-equal scores may differ between runtimes.
    """
    boxes, scores, labels = (torch.as_tensor(_numpy(t)) for t in got)
    e_boxes, e_scores, e_labels = (expected[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    if len(scores) != len(e_scores):
        return f"{len(scores)} detections, the model gives {len(e_scores)}"
    boxes, scores = boxes.to(torch.float64), scores.to(torch.float64)
    free = torch.ones(len(scores), dtype=torch.bool)
    for box, score, label in zip(e_boxes.to(torch.float64), e_scores.to(torch.float64), e_labels.tolist()):
        d = (boxes - box).abs().amax(dim=1)
        ok = free & (labels == label) & ((scores - score).abs() <= score_tol)
        if not bool(ok.any()):
            return f"class {label}: no exported detection with score {float(score):.6f} (within {score_tol:g})"
        j = int(d.masked_fill(~ok, float("inf")).argmin())
        if d[j] > box_tol:
            return f"class {label}: no exported box within {box_tol:g} px of {box.tolist()} (nearest {float(d[j]):.3g})"
        free[j] = False
    return None


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def verify_export(
    model: nn.Module, path: str | Path, sizes: tuple[tuple[int, int], ...] = ((240, 320), (300, 200)),
    images: list[Tensor] | None = None, name: str | Path | None = None,
) -> int:
    """Run the exported file and the model's eval forward on ``images`` (uint8 ``[3, H, W]``; default random
    images of ``sizes``); ExportError naming ``name`` (default ``path``) on a mismatch.

    Returns the number of detections compared, at the model's current
    post-processing settings (those baked into the file when it was traced):
    ``0`` means the model detected nothing on these images, so the check
    compared nothing.
    """
    run = load_exported(path)
    compared = 0
    model.eval()
    if images is None:
        images = [example_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    for k, image in enumerate(images):
        with torch.inference_mode():
            expected = model([image])[0]
        problem = compare_detections(run(image), expected)
        if problem is not None:
            h, w = image.shape[-2:]
            raise ExportError(f"{name or path}: the exported model disagrees with the model on check image {k + 1} "
                              f"({h}x{w}): {problem}")
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
