"""Pictures of an evaluation: per-class precision-recall curves, the confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor


def _save(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and a rename (readable by others)."""
    import matplotlib.pyplot as plt

    from detkit.io import atomic_write

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(
    curves: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    aps: Mapping[str, float],
    path: str | Path,
    title: str = "precision-recall",
) -> Path:
    """One line per class (``(recall, precision, score)`` in rank order), AP in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    for name, (recall, precision, _score) in curves.items():
        if recall.numel() == 0:
            continue
        # The interpolated (monotone) precision, the curve AP integrates.
        interp = precision.flip(0).cummax(0).values.flip(0)
        ap = aps.get(name, math.nan)
        label = f"{name} {ap:.3f}" if not math.isnan(ap) else name
        ax.step([0.0, *recall.tolist()], [float(interp[0]), *interp.tolist()], where="post", label=label, linewidth=1)
    valid = [v for k, v in aps.items() if k in curves and not math.isnan(v)]
    mean = sum(valid) / len(valid) if valid else math.nan
    ax.set_title(f"{title} (mean AP {mean:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if 0 < len(curves) <= 20:
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_confusion_matrix(matrix: Tensor, classes: Sequence[str], path: str | Path, title: str = "confusion matrix") -> Path:
    """The ``[C + 1, C + 1]`` counts, coloured by each true class's share, with the counts written in."""
    plt = _pyplot()
    names = [*classes, "background"]
    n = len(names)
    counts = matrix.double()
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(4 + 0.5 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    im = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ticks = list(range(n)) if n <= 60 else []
    ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, [names[t] for t in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(path))
