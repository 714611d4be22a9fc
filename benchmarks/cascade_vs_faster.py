"""Cascade R-CNN against Faster R-CNN on the clutter preset: COCO AP, AP50, AP75 and time per epoch.

Trains ``configs/scratch/tiny.yaml`` (Faster R-CNN) and ``configs/cascade/tiny.yaml``
(the same recipe with the cascade head of plugins/detkit-cascade) on the same data,
with the same schedule (``--epochs``: the recipe's cosine schedule shortened to that
many epochs, for both) and evaluates both with the COCO and VOC evaluators every
``--eval-every`` epochs and at the end.  ``--parallel`` runs the two at the same
time, ``--threads`` OpenMP threads each, so that both see the same load of a
shared machine; without it they run one after the other.

Time per epoch is the training time only: the wall clock between the last training
record of one epoch and that of the next, less the evaluation in between, as this
script sees the metrics file grow (1 s resolution); the first epoch (start-up) is
left out of the median.

    python benchmarks/cascade_vs_faster.py --data /tmp/clutter --epochs 12 --parallel --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"faster_rcnn": ROOT / "configs/scratch/tiny.yaml", "cascade": ROOT / "configs/cascade/tiny.yaml"}


def detkit(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("detkit")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "detkit.cli", *args]


class Run:
    """One ``detkit train`` and the wall-clock time at which each of its records appeared."""

    def __init__(self, name: str, out: Path, sets: list[str], threads: int | None):
        self.name, self.dir = name, out / name
        cmd = detkit("train", str(RECIPES[name]), "-o", str(self.dir), *[a for s in sets for a in ("--set", s)])
        print("$", " ".join(cmd), flush=True)
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.records: list[tuple[float, dict]] = []
        self.loads: list[float] = []

    def poll(self) -> bool:
        """Read new records; True once the process has ended."""
        done = self.proc.poll() is not None
        metrics = self.dir / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            now = time.perf_counter() - self.start
            for line in lines[len(self.records):]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line still being written: read it next time
                self.records.append((now, rec))
                if rec.get("type") == "eval":
                    print(f"{self.name:>12} epoch {rec['epoch'] + 1:>3} {now / 60:6.1f} min  "
                          f"AP {rec.get('coco/AP', float('nan')):.4f}  AP50 {rec.get('coco/AP50', float('nan')):.4f}  "
                          f"AP75 {rec.get('coco/AP75', float('nan')):.4f}  load {os.getloadavg()[0]:.1f}", flush=True)
            self.loads.append(os.getloadavg()[0])
        return done

    def summary(self) -> dict:
        last_train: dict[int, float] = {}
        evals: dict[int, tuple[float, dict]] = {}
        for t, rec in self.records:
            if rec.get("type") == "train":
                last_train[rec["epoch"]] = t
            elif rec.get("type") == "eval":
                evals[rec["epoch"]] = (t, rec)
        epochs = sorted(last_train)
        times = []
        for e in epochs[1:]:
            before = evals[e - 1][0] if e - 1 in evals else last_train[e - 1]
            times.append(last_train[e] - before)
        final = evals[max(evals)][1] if evals else {}
        return {
            "recipe": self.name, "epochs": len(epochs), "returncode": self.proc.returncode,
            "seconds_per_epoch_median": statistics.median(times) if times else None,
            "seconds_per_epoch": [round(t, 1) for t in times],
            "minutes_total": round(self.records[-1][0] / 60, 1) if self.records else None,
            "load_mean": round(statistics.mean(self.loads), 1) if self.loads else None,
            "final": {k: final.get(k) for k in ("coco/AP", "coco/AP50", "coco/AP75", "voc/mAP")},
            "curve": [{"epoch": e + 1, **{k: r.get(k) for k in ("coco/AP", "coco/AP50", "coco/AP75", "voc/mAP")}}
                      for e, (_, r) in sorted(evals.items())],
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "detkit_clutter")
    ap.add_argument("--epochs", type=int, default=22, help="the schedule of both runs (the recipe's: 22)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parallel", action="store_true", help="both runs at once (the same load for both)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    if not (args.data / "ImageSets" / "Main" / "val.txt").is_file():
        subprocess.run(detkit("data", "synth", str(args.data), "--preset", "clutter"), check=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="cascade_vs_faster_"))
    sets = [f"data.train.root={args.data}", f"data.val.root={args.data}", f"train.epochs={args.epochs}",
            f"eval.interval={args.eval_every}", "eval.metric=[coco, voc]", *args.overrides]
    names = list(RECIPES)
    runs: list[Run] = []
    pending = list(names)
    while pending or any(r.proc.returncode is None for r in runs):
        if pending and (args.parallel or all(r.proc.returncode is not None for r in runs)):
            runs.append(Run(pending.pop(0), out, sets, args.threads))
            continue
        for run in runs:
            run.poll()
        time.sleep(1)
    for run in runs:
        run.poll()
    results = [run.summary() for run in runs]
    for run, res in zip(runs, results):
        if run.proc.returncode:
            print(f"{run.name} failed:\n{run.proc.stderr.read()[-2000:]}", file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"runs in {out}")
    return 1 if any(run.proc.returncode for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
