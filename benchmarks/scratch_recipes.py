"""Training from scratch on the clutter preset: val mAP@0.5 against epochs and minutes.

Writes the clutter set (400 train / 100 val, VOC layout) unless it is there,
runs ``detkit train`` on a recipe of ``configs/scratch/`` and prints one row
per evaluation: epoch, wall-clock minutes since the start, mAP@0.5 and the
machine's 1-minute load average (this machine may be shared: the load says
how much of it the run had).  ``--baseline`` runs the untuned recipe of
issue 12 instead (the quickstart recipe scaled to 480 px, batch 16, its
anchors) with the same data and epochs, for the equal-budget comparison.

    python benchmarks/scratch_recipes.py tiny --data /tmp/clutter
    python benchmarks/scratch_recipes.py resnet50_gn --data /tmp/clutter --set train.amp=true
    python benchmarks/scratch_recipes.py tiny --data /tmp/clutter --baseline --set train.epochs=8

``--minutes M`` stops the run after M minutes of wall clock (SIGTERM, which
``detkit train`` turns into a checkpoint and a clean exit), for a fixed time
budget whatever the recipe's schedule: the equal-budget baseline runs this way.

Everything after the recipe's own settings comes from ``--set`` (repeatable),
as with ``detkit train``.  The run directory (``--out``, default a
temporary one) keeps metrics.jsonl, the checkpoints and ``curve.json``
(the rows printed here).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = "[circle,square,triangle,cross,diamond,ring]"
# The untuned recipe of issue 12's table: the quickstart recipe scaled to 480 px, batch 16.
BASELINE = [
    "model.preprocess.min_size=480", "model.preprocess.max_size=480",
    "data.batch_size=16",
]


def detkit(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("detkit")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "detkit.cli", *args]


def ensure_data(data: Path, seed: int) -> None:
    if (data / "ImageSets" / "Main" / "val.txt").is_file():
        return
    t = time.perf_counter()
    subprocess.run(detkit("data", "synth", str(data), "--preset", "clutter", "--seed", str(seed)), check=True)
    print(f"wrote the clutter set to {data} in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="tiny, resnet50_gn, or a config path")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "detkit_clutter")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clutter set")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--baseline", action="store_true", help="the untuned quickstart-at-480px recipe instead")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--minutes", type=float, default=None, help="stop the run after this many minutes")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the run (on a crowded CPU, 1 beats 2: threads that wait spin)")
    args = ap.parse_args()

    config = Path(args.recipe)
    if not config.suffix:
        config = ROOT / "configs" / "scratch" / f"{args.recipe}.yaml"
    ensure_data(args.data, args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="scratch_"))
    sets = [f"data.train.root={args.data}", f"data.val.root={args.data}"]
    if args.baseline:
        config = ROOT / "configs" / "quickstart.yaml"
        sets += [
            "data.train={type: voc, root: %s, split: train, classes: %s}" % (args.data, CLASSES),
            "data.val={type: voc, root: %s, split: val, classes: %s}" % (args.data, CLASSES),
            *BASELINE,
        ]
    sets += args.overrides
    cmd = detkit("train", str(config), "-o", str(out), *[a for s in sets for a in ("--set", s)])
    print("$", " ".join(cmd), flush=True)
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    rows: list[dict] = []
    seen, stopped = 0, False
    print(f"{'epoch':>5} {'minutes':>8} {'mAP@0.5':>8} {'load':>5}", flush=True)
    while True:
        done = proc.poll() is not None
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                rec = json.loads(line)
                if rec.get("type") == "eval" and "mAP" in rec:
                    row = {"epoch": rec["epoch"] + 1, "minutes": (time.perf_counter() - start) / 60,
                           "mAP": rec["mAP"], "load": os.getloadavg()[0]}
                    rows.append(row)
                    print(f"{row['epoch']:>5} {row['minutes']:>8.1f} {row['mAP']:>8.4f} {row['load']:>5.1f}", flush=True)
            seen = len(lines)
        if done:
            break
        if args.minutes is not None and not stopped and time.perf_counter() - start > args.minutes * 60:
            proc.send_signal(signal.SIGTERM)  # checkpoint, then exit 143
            stopped = True
            print(f"stopped after {args.minutes:g} minutes", flush=True)
        time.sleep(5)
    (out / "curve.json").write_text(json.dumps(rows, indent=1))
    if proc.returncode and not stopped:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
        return proc.returncode
    best = max(rows, key=lambda r: r["mAP"]) if rows else None
    if best:
        print(f"best mAP@0.5 {best['mAP']:.4f} at epoch {best['epoch']} ({best['minutes']:.1f} min); run in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
