"""Run outputs: a JSON-lines metrics file, a console display, the loss-curve PNG."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.text import Text

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Fields of a "train" record that are not losses; every other number is one of
# the trainer's named losses (the engine takes the names from its step's dict).
TRAIN_RECORD_FIELDS = ("type", "epoch", "step", "lr", "images_per_s", "backbone_frozen", "time")


def loss_names_of(record: dict[str, Any]) -> list[str]:
    """The loss names in a "train" record: its numeric fields other than the bookkeeping ones."""
    return [
        k for k, v in record.items()
        if k not in TRAIN_RECORD_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes it.

    A resumed run appends to the same file, so the curve stays continuous.
    Each line also carries ``time``, the Unix time it was written, so a curve can be
    read against wall-clock minutes (``benchmarks/scratch_recipes.py``).
    (TensorBoard is a tracker hook: :mod:`detkit.engine.trackers`.)
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line that does not parse is skipped with a warning.

    A crash (``kill -9``, a full disk) in the middle of a write leaves a torn
    last line; it must not turn the rest of the file, or a finished run's
    summary, into a traceback.
    """
    if not path.exists():
        return []
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(n)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(n)
    if bad and warn:
        import warnings

        lines = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped unparsable line(s) {lines} (a write cut short by a crash?)", stacklevel=2)
    return records


def trim_metrics(path: Path, step: int) -> int:
    """Keep the records up to ``step`` (and unparsable lines out); returns how many were dropped.

    A run resumed from a checkpoint of step ``step`` trains the later steps
    again: their old records (and a torn last line) go, so the file holds
    each step once.  Rewritten atomically; untouched when nothing is dropped.
    """
    from detkit.io import atomic_write_text

    if not path.exists():
        return 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip()]
    records = read_metrics(path, warn=False)
    keep = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    dropped = len(lines) - len(keep)
    if dropped:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return dropped


class _ProgressWithInfo(Progress):
    """A progress bar with a free-text line under it (the losses, too long for a column)."""

    info = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.info:
            yield Text(self.info, overflow="fold")


class TrainDisplay:
    """A rich progress bar on a terminal; plain log lines elsewhere (CI, files).

    Bar line: epoch, bar, step/total, elapsed, ETA, images/s; under it the
    named losses and the learning rate of the last logging window.
    """

    def __init__(self, console: Console, total_steps: int, start_step: int):
        self.console = console
        self.live = console.is_terminal
        self.progress = _ProgressWithInfo(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, epoch="-", rate="")

    def __enter__(self) -> "TrainDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def advance(self, epoch: int, epochs: int) -> None:
        self.progress.update(self.task, advance=1, epoch=f"{epoch + 1}/{epochs}")

    def log(self, record: dict[str, Any], names: Sequence[str] | None = None) -> None:
        info = format_train_record(record, names)
        self.progress.info = info
        self.progress.update(self.task, rate=f"{record['images_per_s']:.1f} img/s")
        if not self.live:
            self.console.print(
                f"epoch {record['epoch'] + 1} step {record['step']}  {info}",
                markup=False, highlight=False, soft_wrap=True,
            )

    @contextmanager
    def subtask(self, label: str) -> Iterator[Callable[[int, int], None]]:
        """A second bar (validation) under the training bar while the block runs, then removed.

        Yields ``update(done, total)``.
        """
        task = self.progress.add_task(label, total=None, epoch=label, rate="")
        try:
            yield lambda done, total: self.progress.update(task, completed=done, total=total)
        finally:
            self.progress.remove_task(task)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def format_train_record(r: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """``rpn_loc=0.123 ... total=1.234  lr=1.00e-03  img/s=12.3``; ``names`` default to the record's losses.

    One ``key=value`` word per figure: a line too long for the terminal wraps between them, never inside one.
    """
    names = loss_names_of(r) if names is None else names
    losses = " ".join(f"{k}={r[k]:.3f}" for k in names if k in r)
    return f"{losses}  lr={r['lr']:.2e}  img/s={r['images_per_s']:.1f}"


def plot_losses(metrics_path: Path, out: Path, names: Sequence[str] | None = None) -> Path | None:
    """Draw each named loss against the step; written atomically. None without data.

    ``names`` default to the losses found in the records (in first-seen order).
    """
    records = [r for r in read_metrics(metrics_path) if r.get("type") == "train"]
    if not records:
        return None
    if names is None:
        names = list(dict.fromkeys(k for r in records for k in loss_names_of(r)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in names:
        points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=2 if name == "total" else 1)
    evals = [r for r in read_metrics(metrics_path) if r.get("type") == "eval" and "mAP" in r]
    if evals:
        key = evals[-1].get("best_key") or "mAP@0.5"  # "mAP" holds the eval.best metric
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["mAP"] for r in evals], "k--o", label=f"val {key}")
        ax2.set_ylabel(key)
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    from detkit.io import atomic_write

    try:
        return atomic_write(out, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)


class Throughput:
    """Images per second over the last logging window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.t0, 1e-9)
        self.t0, self.images = now, 0
        return rate
