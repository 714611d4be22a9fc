"""Data statistics and anchor coverage (``detkit data stats``).

For a config's training split, resized as the detector's preprocessing
resizes it (``model.preprocess``): image and box size distributions, boxes per class, and how well
the configured anchors cover the ground truth.  A box's *best anchor IoU* is
its largest IoU with any anchor of an input of its image's size; the RPN
only learns a box as a positive if some anchor reaches its positive
threshold (0.7, or failing that the best anchor), so a low share at 0.7 and
0.5 means boxes the detector will find hard to propose.

The suggestion clusters ``sqrt(area) / base_size`` and the aspect ratios of
the boxes (1-D k-means in log space, as many clusters as the config has
scales and ratios, so the RPN head keeps its size), measures the coverage
of the anchors the detector builds from it, and prints the YAML to paste.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detkit.errors import DataError

THRESHOLDS: tuple[float, ...] = (0.7, 0.5, 0.3)
PERCENTILES: tuple[int, ...] = (5, 25, 50, 75, 95)


# ------------------------------------------------------------------ coverage
def best_anchor_iou(boxes: Tensor, anchors: Tensor, chunk: int = 256) -> Tensor:
    """``[G]`` largest IoU of each of ``[G, 4]`` boxes with any of ``[A, 4]`` anchors."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0)
    if anchors.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    anchors = anchors.to(boxes)
    # Chunked: [G, A] for a VOC-sized input is ~20k anchors per box.
    return torch.cat([box_iou(b, anchors).amax(dim=1) for b in boxes.split(chunk)])


def coverage(best: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """``{">=0.7": share, ">=0.5": ..., ">=0.3": ..., "median": median best IoU}``."""
    if best.numel() == 0:
        return {**{f">={t:g}": math.nan for t in thresholds}, "median": math.nan}
    out = {f">={t:g}": float((best >= t).double().mean()) for t in thresholds}
    out["median"] = float(best.double().quantile(0.5))
    return out


def kmeans_1d(x: Tensor, k: int, iters: int = 20) -> Tensor:
    """``[k]`` sorted cluster centres of values ``[G]`` (Lloyd's algorithm from quantile centres)."""
    x = x.double()
    centres = x.quantile((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        assign = (x[:, None] - centres[None, :]).abs().argmin(dim=1)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).double()
        # An emptied cluster keeps its centre rather than collapsing.
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres.sort().values


def suggest_anchors(
    boxes: Tensor, num_scales: int, num_ratios: int, base_size: float = 16.0
) -> tuple[list[float], list[float]]:
    """Anchor ``(scales, ratios)`` for ``[G, 4]`` boxes; ratios are height / width."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3).double()
    log_scale = (wh.prod(dim=1).sqrt() / base_size).log()
    log_ratio = (wh[:, 1] / wh[:, 0]).log()
    scales = [_round(math.exp(v)) for v in kmeans_1d(log_scale, num_scales).tolist()]
    ratios = [_round(math.exp(v)) for v in kmeans_1d(log_ratio, num_ratios).tolist()]
    return _dedupe(scales), _dedupe(ratios)


def suggest_level_sizes(boxes: Tensor, num_levels: int, per_level: int) -> list[list[float]]:
    """Per-level anchor sizes (px) for ``[G, 4]`` boxes: ``num_levels * per_level`` clusters of
    ``sqrt(w * h)``, smallest first, ``per_level`` to a level (finest level first)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3).double()
    centres = kmeans_1d(wh.prod(dim=1).sqrt().log(), num_levels * per_level).exp().tolist()
    sizes = [_round(v) for v in centres]
    return [sizes[i * per_level:(i + 1) * per_level] for i in range(num_levels)]


def _round(v: float) -> float:
    """Two significant digits: readable in a config, precise enough for anchors."""
    return float(f"{v:.2g}")


def _dedupe(values: list[float]) -> list[float]:
    return sorted(set(values))


# --------------------------------------------------------------- annotations
@dataclass
class Annotations:
    """The boxes of a split: image sizes ``[N, 2]``, boxes ``[G, 4]``, labels / image index ``[G]``."""

    classes: list[str]
    sizes: Tensor
    boxes: Tensor
    labels: Tensor
    image_index: Tensor
    difficult: Tensor


def collect_annotations(dataset: Any, max_images: int | None = None) -> Annotations:
    """Sizes and boxes of ``dataset`` (a :class:`TransformedDataset` in eval mode), no pixels if possible."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    sizes, boxes, labels, index, difficult = [], [], [], [], []
    for i in range(n):
        found = dataset.annotation(i)  # header-only where the data set can
        if found is None:
            image, t = dataset[i]
            found = (tuple(image.shape[-2:]), t)
        size, t = found
        sizes.append(list(size))
        boxes.append(t["boxes"].float().reshape(-1, 4))
        labels.append(t["labels"].long().reshape(-1))
        difficult.append(t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)).reshape(-1))
        index.append(torch.full((len(t["labels"]),), i, dtype=torch.long))
    return Annotations(
        classes=list(dataset.classes),
        sizes=torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        boxes=torch.cat(boxes) if boxes else torch.zeros(0, 4),
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        image_index=torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
        difficult=torch.cat(difficult).bool() if difficult else torch.zeros(0, dtype=torch.bool),
    )


def at_network_input(ann: Annotations, model: Any) -> Annotations:
    """``ann`` resized as the detector's preprocessing resizes each image (``model.input_size``)."""
    if ann.sizes.shape[0] == 0:
        return ann
    new = torch.tensor([list(model.input_size(int(h), int(w))) for h, w in ann.sizes.tolist()], dtype=torch.long)
    factor = (new.double() / ann.sizes.double())[ann.image_index]  # [G, 2] (sy, sx)
    boxes = (ann.boxes.double() * factor.flip(1).repeat(1, 2)).float()
    return Annotations(classes=ann.classes, sizes=new, boxes=boxes, labels=ann.labels,
                       image_index=ann.image_index, difficult=ann.difficult)


def without_degenerate_boxes(ann: Annotations) -> Annotations:
    """``ann`` without zero-area boxes: they say nothing about anchor sizes (and would suggest ~0)."""
    keep = ((ann.boxes[:, 2:] - ann.boxes[:, :2]) > 0).all(dim=1)
    if bool(keep.all()):
        return ann
    return Annotations(classes=ann.classes, sizes=ann.sizes, boxes=ann.boxes[keep], labels=ann.labels[keep],
                       image_index=ann.image_index[keep], difficult=ann.difficult[keep])


def anchor_coverage(
    ann: Annotations, anchors_for: Callable[[tuple[int, int]], Tensor], size_divisor: int = 0
) -> Tensor:
    """``[G]`` best anchor IoU of every box, with anchors for its image's (padded) input size."""
    best = torch.zeros(ann.boxes.shape[0])
    if ann.boxes.shape[0] == 0:
        return best
    sizes = ann.sizes[ann.image_index]
    if size_divisor > 1:
        sizes = (sizes + size_divisor - 1) // size_divisor * size_divisor
    uniq, group = torch.unique(sizes, dim=0, return_inverse=True)
    for k, (h, w) in enumerate(uniq.tolist()):  # one anchor set per distinct input size
        sel = group == k
        best[sel] = best_anchor_iou(ann.boxes[sel], anchors_for((h, w)).detach().float().cpu())
    return best


def percentiles(x: Tensor, ps: Sequence[int] = PERCENTILES) -> list[float]:
    if x.numel() == 0:
        return [math.nan] * len(ps)
    return x.double().quantile(torch.tensor(ps, dtype=torch.float64) / 100).tolist()


# -------------------------------------------------------------------- report
@dataclass
class StatsReport:
    """Everything ``detkit data stats`` prints."""

    source: str
    num_images: int
    classes: list[str]
    distributions: dict[str, list[float]]  # name -> percentiles
    per_class: list[tuple[str, int, int]]  # (class, boxes, difficult)
    anchors: dict[str, Any]  # the configured anchor parameters
    anchor_path: list[str] | None  # where they live in the config
    current: dict[str, float]
    suggested: dict[str, Any] | None = None
    suggested_coverage: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the recipe does not fit the data (fit_warnings)
    boxes_line: str | None = None  # what the reader clipped and dropped (detkit.data.box_report)


def find_anchor_section(section: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Path of the first mapping with ``ratios`` and ``scales`` (one map) or ``sizes`` (levels)."""
    if isinstance(section, dict):
        if "ratios" in section and ("scales" in section or section.get("sizes") is not None):
            return path
        for key, value in section.items():
            found = find_anchor_section(value, (*path, key))
            if found is not None:
                return found
    return None


def _get(d: dict[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        d = d[key]
    return d


def _multi_level(sec: dict[str, Any]) -> bool:
    return sec.get("sizes") is not None


def _with_anchors(model_cfg: dict[str, Any], path: Sequence[str], scales: list, ratios: list[float]) -> dict[str, Any]:
    """A copy of ``model_cfg`` with these anchors: ``scales`` are per-level ``sizes`` for levels."""
    import copy

    out = copy.deepcopy(model_cfg)
    sec = _get(out, path)
    key = "sizes" if _multi_level(sec) else "scales"
    sec[key], sec["ratios"] = [list(v) if isinstance(v, (list, tuple)) else v for v in scales], list(ratios)
    return out


def _detector_anchors(model_cfg: dict[str, Any], num_classes: int, model: Any = None) -> Callable[[tuple[int, int]], Tensor]:
    """``size -> anchors`` of the detector built from ``model_cfg`` (no pretrained weights)."""
    from detkit.registry import build_detector

    model = model if model is not None else build_detector(model_cfg, num_classes)
    cache: dict[tuple[int, int], Tensor] = {}

    def anchors_for(size: tuple[int, int]) -> Tensor:
        if size not in cache:
            with torch.no_grad():
                cache[size] = model.anchors(size).detach().cpu()
        return cache[size]

    return anchors_for


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether coverage ``a`` beats ``b`` (shares at 0.7 and 0.5, then the median)."""
    key = lambda c: (round(c[">=0.7"] + c[">=0.5"], 4), c["median"])  # noqa: E731
    return key(a) > key(b)


def dataset_stats(cfg: Any, max_images: int | None = None, source: str = "<config>") -> StatsReport:
    """Statistics of ``cfg``'s training split (a :class:`detkit.config.Config`)."""
    from detkit.data.loader import build_dataset

    from detkit.data.box_report import find_box_report

    from detkit.registry import build_detector

    dataset = build_dataset(cfg.data, "train", augment=False)
    if len(dataset) == 0:
        raise DataError(f"{source}: data.train is empty (0 images); nothing to measure")
    model_cfg = cfg.model.to_dict()
    num_classes = len(dataset.classes)
    model = build_detector(model_cfg, num_classes)
    # Boxes as the network sees them: the detector's own preprocessing sizes each image.
    ann = without_degenerate_boxes(at_network_input(collect_annotations(dataset, max_images), model))
    box_report = find_box_report(dataset)
    n_img = ann.sizes.shape[0]
    wh = (ann.boxes[:, 2:] - ann.boxes[:, :2]).clamp(min=0)
    per_image = torch.bincount(ann.image_index, minlength=n_img)
    dist = {
        "image height": percentiles(ann.sizes[:, 0].float()),
        "image width": percentiles(ann.sizes[:, 1].float()),
        "boxes per image": percentiles(per_image.float()),
        "box width": percentiles(wh[:, 0]),
        "box height": percentiles(wh[:, 1]),
        "box sqrt(area)": percentiles(wh.prod(dim=1).sqrt()),
        "box height/width": percentiles(wh[:, 1] / wh[:, 0].clamp(min=1e-6)),
    }
    counts = torch.bincount(ann.labels, minlength=len(ann.classes)).tolist()
    diffs = torch.bincount(ann.labels[ann.difficult], minlength=len(ann.classes)).tolist()
    per_class = list(zip(ann.classes, counts, diffs))

    path = find_anchor_section(model_cfg)
    size_divisor = model.preprocess.params.size_divisible
    current = coverage(anchor_coverage(ann, _detector_anchors(model_cfg, num_classes, model), size_divisor))
    report = StatsReport(
        source=source, num_images=n_img, classes=ann.classes, distributions=dist, per_class=per_class,
        anchors=dict(_get(model_cfg, path)) if path is not None else {}, anchor_path=list(path) if path else None,
        current=current, boxes_line=box_report.line("data.train") if box_report is not None else None,
    )  # fmt: skip
    if ann.boxes.shape[0] == 0:
        report.notes.append("no boxes: nothing to cover")
        return report
    if path is None:
        report.notes.append("the model config has no section with 'scales' and 'ratios'; no suggestion")
        return report

    sec = report.anchors
    if _multi_level(sec):  # one list of sizes per pyramid level
        scales = suggest_level_sizes(ann.boxes, len(sec["sizes"]), len(sec["sizes"][0]))
        _, ratios = suggest_anchors(ann.boxes, 1, len(sec["ratios"]))
    else:
        base = float(sec.get("base_size", 16.0))
        scales, ratios = suggest_anchors(ann.boxes, len(sec["scales"]), len(sec["ratios"]), base)
    # Ratios are height/width here; a detector may define them the other way round.
    # Build both and keep the one that covers better, so the printed values are the
    # ones this detector needs.
    candidates = [ratios]
    inverted = _dedupe([_round(1 / r) for r in ratios])
    if inverted != ratios:
        candidates.append(inverted)
    best_cov, best_ratios = None, ratios
    for cand in candidates:
        anchors_for = _detector_anchors(_with_anchors(model_cfg, path, scales, cand), num_classes)
        cov = coverage(anchor_coverage(ann, anchors_for, size_divisor))
        if best_cov is None or _better(cov, best_cov):
            best_cov, best_ratios = cov, cand
    report.suggested = {anchor_key(sec): scales, "ratios": best_ratios}
    report.suggested_coverage = best_cov
    if best_cov is not None and not _better(best_cov, current):
        report.notes.append("the configured anchors already cover these boxes as well as the suggestion")
    report.warnings = fit_warnings(ann, current, model, model_cfg, path, size_divisor)
    return report


# Below these, ``detkit data stats`` warns that the recipe does not fit the data.
MIN_SHARE_AT_05 = 0.9  # boxes with some anchor at IoU >= 0.5


def _find_section(section: Any, keys: Sequence[str], path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Path of the first mapping of the model config that has all of ``keys``."""
    if isinstance(section, dict):
        if all(k in section for k in keys):
            return path
        for k, v in section.items():
            found = _find_section(v, keys, (*path, k))
            if found is not None:
                return found
    return None


def fit_warnings(ann: Annotations, current: dict[str, float], model: Any, model_cfg: dict[str, Any],
                 anchor_path: Sequence[str] | None, size_divisor: int) -> list[str]:
    """Where the configured anchors or input size do not fit the boxes, one line each naming the field.

    - fewer than ``MIN_SHARE_AT_05`` of the boxes have an anchor at IoU >= 0.5: the RPN
      then learns those boxes only through their single best anchor;
    - the median box at the input size is smaller than the smallest anchor: most objects
      are proposed from anchors larger than themselves.
    """
    out: list[str] = []
    if ann.boxes.shape[0] == 0:
        return out
    anchor_field = "model." + ".".join((*anchor_path, anchor_key(_get(model_cfg, anchor_path)))) if anchor_path else \
        "the anchor sizes of the proposal generator"
    share = current[">=0.5"]
    if not math.isnan(share) and share < MIN_SHARE_AT_05:
        out.append(f"only {share:.0%} of the boxes have an anchor at IoU >= 0.5 (at least {MIN_SHARE_AT_05:.0%} "
                   f"expected): set {anchor_field} (the suggestion below), or the input size")
    h, w = (int(v) for v in ann.sizes[0].tolist())
    if size_divisor > 1:
        h, w = -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
    with torch.no_grad():
        anchors = model.anchors((h, w)).detach().float().cpu()
    if anchors.shape[0] == 0:
        return out
    smallest = float((anchors[:, 2:] - anchors[:, :2]).clamp(min=0).prod(dim=1).sqrt().min())
    wh = (ann.boxes[:, 2:] - ann.boxes[:, :2]).clamp(min=0)
    median = float(wh.prod(dim=1).sqrt().double().quantile(0.5))
    if median < smallest:
        pre = _find_section(model_cfg, ("min_size", "max_size"))  # the resize, not the RPN's box filter
        size_field = "model." + ".".join((*pre, "min_size")) if pre is not None else "the input size"
        now = _get(model_cfg, pre).get("min_size") if pre is not None else None
        want = f" (now {now}; about {math.ceil(now * smallest / median)} makes it {smallest:.0f} px)" \
            if isinstance(now, (int, float)) else ""
        out.append(f"the median box is {median:.1f} px at the input size, smaller than the smallest anchor "
                   f"({smallest:.1f} px): raise {size_field}{want}, or lower the smallest of {anchor_field}")
    return out


# ------------------------------------------------------------- image check
@dataclass
class ImageCheck:
    """``data stats --check-images``: how many images of a split decode, and why the others do not."""

    split: str
    checked: int
    unreadable: list[str]  # one line each, naming the file


def check_images(
    dataset: Any, split: str, progress: Callable[[int, int], None] | None = None
) -> ImageCheck:
    """Decode every image of ``dataset`` (a split as :func:`build_dataset` returns it).

    The reader's own items are loaded (no transforms), so a missing, truncated or
    corrupt file is found here rather than in the middle of an epoch.
    """
    inner = getattr(dataset, "dataset", dataset)
    n = len(inner)
    if n == 0:
        raise DataError(f"data.{split} is empty (0 images)")
    bad: list[str] = []
    for i in range(n):
        try:
            inner[i]
        except DataError as exc:
            bad.append(str(exc))
        except Exception as exc:  # a plugin's reader: still one line per image
            bad.append(f"data.{split} image {i}: {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(i + 1, n)
    return ImageCheck(split, n, bad)


def yaml_snippet(path: Sequence[str], scales: list, ratios: list[float], key: str = "scales") -> str:
    """The config lines setting the anchors at ``model.<path>`` (``key``: ``scales``, or ``sizes``
    with one list per level)."""
    lines, indent = [], ""
    for part in ("model", *path):
        lines.append(f"{indent}{part}:")
        indent += "  "
    lines.append(f"{indent}{key}: {_flow(scales)}")
    lines.append(f"{indent}ratios: {_flow(ratios)}")
    return "\n".join(lines)


def _flow(values: Sequence[Any]) -> str:
    """A YAML flow list of numbers or of lists of numbers: ``[1.5, 3]``, ``[[32], [64]]``."""
    return "[" + ", ".join(_flow(v) if isinstance(v, (list, tuple)) else f"{v:g}" for v in values) + "]"


def anchor_key(anchors: dict[str, Any]) -> str:
    """``sizes`` for per-level anchors, else ``scales``."""
    return "sizes" if _multi_level(anchors) else "scales"


def print_report(report: StatsReport, console: Any) -> None:
    """Rich tables of a :class:`StatsReport`."""
    from rich.table import Table

    t = Table(title=f"{report.source}: training split, {report.num_images} images (eval-mode transforms)")
    t.add_column("")
    for p in PERCENTILES:
        t.add_column(f"p{p}", justify="right")
    for name, vals in report.distributions.items():
        t.add_row(name, *(f"{v:.3g}" if not math.isnan(v) else "-" for v in vals))
    console.print(t)
    if report.boxes_line:
        console.print(report.boxes_line, markup=False, highlight=False, soft_wrap=True)

    total = sum(n for _, n, _ in report.per_class) or 1
    c = Table(title="boxes per class")
    for col in ("class", "boxes", "share", "difficult"):
        c.add_column(col, justify="left" if col == "class" else "right")
    for name, n, d in report.per_class:
        c.add_row(name, str(n), f"{n / total:.1%}", str(d))
    console.print(c)

    a = Table(title="anchor coverage: share of boxes whose best anchor IoU reaches")
    a.add_column("anchors")
    for key in (*(f">={t:g}" for t in THRESHOLDS), "median"):
        a.add_column(key if key == "median" else f"IoU {key}", justify="right")

    def row(label: str, cov: dict[str, float]) -> list[str]:
        cells = [f"{cov[f'>={t:g}']:.1%}" for t in THRESHOLDS] + [f"{cov['median']:.3f}"]
        return [label, *(x if "nan" not in x else "-" for x in cells)]

    sec = report.anchors
    key = anchor_key(sec) if sec else "scales"
    if sec:
        a.add_row(*row(f"configured: {key} {sec.get(key)} ratios {sec.get('ratios')}", report.current))
    else:
        a.add_row(*row("configured", report.current))
    if report.suggested is not None and report.suggested_coverage is not None:
        s = report.suggested
        a.add_row(*row(f"suggested: {key} {s[key]} ratios {s['ratios']}", report.suggested_coverage))
    console.print(a)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if report.suggested is not None and report.anchor_path is not None:
        s = report.suggested
        console.print("To use the suggested anchors, put this in the config:", markup=False, highlight=False)
        console.print(yaml_snippet(report.anchor_path, s[key], s["ratios"], key), markup=False, highlight=False)
        dotted = ".".join(("model", *report.anchor_path))
        fmt = lambda xs: _flow(xs).replace(" ", "")  # noqa: E731
        console.print(
            f"or: --set {dotted}.{key}={fmt(s[key])} --set {dotted}.ratios={fmt(s['ratios'])}",
            markup=False, highlight=False, soft_wrap=True,
        )
