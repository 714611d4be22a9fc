"""From-scratch recipes on two data sets: val mAP@0.5 and COCO AP against epochs and minutes.

A recipe of ``configs/scratch/`` is trained on

- ``clutter``: the clutter preset it was chosen on (``detkit data synth DIR --preset
  clutter``: 400 train / 100 val images of 320-480 px, six shapes on generated scenes);
- ``heldout``: the held-out set of ``benchmarks/photo_voc.py`` (the renderer's shapes,
  stars instead of diamonds, on crops of twelve real photographs; smaller and more
  numerous objects), which no recipe is tuned on,

with only the data roots and class names changed, and one row is printed per evaluation:
set, epoch, wall-clock minutes since the start, mAP@0.5 (VOC all-point), COCO AP
(0.5:0.95) and the machine's 1-minute load average (this machine may be shared: the load
says how much of it the run had).  A summary per set closes the run.  Either set is
written first when it is not there.

    python benchmarks/scratch_recipes.py tiny                      # both sets, one after the other
    python benchmarks/scratch_recipes.py tiny --parallel           # both at once, one thread each
    python benchmarks/scratch_recipes.py tiny --only heldout --set train.ema.decay=0.998
    python benchmarks/scratch_recipes.py resnet50_gn --set train.amp=true          # on a GPU
    python benchmarks/scratch_recipes.py --report RUN_DIR [RUN_DIR ...]           # runs already made

``--baseline`` trains the untuned recipe of issue 12 instead (the quickstart recipe scaled
to 480 px, batch 16, its anchors).  ``--minutes M`` stops each run after M minutes of wall
clock (SIGTERM, which ``detkit train`` turns into a checkpoint and a clean exit), for a
fixed time budget whatever the recipe's schedule.  Everything after the recipe's own
settings comes from ``--set`` (repeatable), as with ``detkit train``.  Each run directory
(under ``--out``, default a temporary one) keeps metrics.jsonl, the checkpoints and
``curve.json`` (the rows printed here).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
TMP = Path(tempfile.gettempdir())
CLUTTER_CLASSES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
# The untuned recipe of issue 12's table: the quickstart recipe scaled to 480 px, batch 16.
BASELINE = [
    "model.preprocess.min_size=480", "model.preprocess.max_size=480",
    "data.batch_size=16",
]
TARGET = 0.80


def detkit(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("detkit")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "detkit.cli", *args]


def ensure_clutter(data: Path, seed: int) -> list[str]:
    if not (data / "ImageSets" / "Main" / "val.txt").is_file():
        t = time.perf_counter()
        subprocess.run(detkit("data", "synth", str(data), "--preset", "clutter", "--seed", str(seed)), check=True)
        print(f"wrote the clutter set to {data} in {time.perf_counter() - t:.0f} s", flush=True)
    return CLUTTER_CLASSES


def ensure_heldout(data: Path, seed: int) -> list[str]:
    from photo_voc import HELDOUT, fetch_sample_photos, make_heldout

    if not (data / "ImageSets" / "Main" / "val.txt").is_file():
        t = time.perf_counter()
        photos = fetch_sample_photos(data.with_name(data.name + "_photos"))
        make_heldout(data, photos, seed=seed)
        print(f"wrote the held-out set to {data} in {time.perf_counter() - t:.0f} s", flush=True)
    return list(HELDOUT["classes"])  # type: ignore[arg-type]


def data_sets(config: Path, data: Path, classes: list[str], baseline: bool) -> list[str]:
    """The ``--set`` arguments that point ``config`` at a VOC set with these classes."""
    names = "[" + ",".join(classes) + "]"
    if baseline:  # the quickstart's data section is synthetic: replace it whole
        return [f"data.train={{type: voc, root: {data}, split: train, classes: {names}}}",
                f"data.val={{type: voc, root: {data}, split: val, classes: {names}}}", *BASELINE]
    return [f"data.train.root={data}", f"data.val.root={data}",
            f"data.train.classes={names}", f"data.val.classes={names}"]


def eval_rows(run_dir: Path, start: float | None = None) -> list[dict]:
    """One row per eval record of ``run_dir/metrics.jsonl``; minutes from ``start`` (default: when the
    run wrote its config.yaml) by the records' ``time``."""
    path = run_dir / "metrics.jsonl"
    if start is None:
        start = (run_dir / "config.yaml").stat().st_mtime
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("type") == "eval" and "mAP" in rec:
            rows.append({"epoch": rec["epoch"] + 1, "minutes": (rec["time"] - start) / 60 if "time" in rec else None,
                         "mAP": rec.get("voc/mAP", rec["mAP"]), "AP": rec.get("coco/AP"),
                         "per_class": rec.get("AP", {})})
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_row(name: str, row: dict) -> None:
    print(f"{name:>14} {row['epoch']:>5} {fmt(row['minutes'], '.1f'):>8} {row['mAP']:>8.4f} {fmt(row['AP'], '.4f'):>8} "
          f"{fmt(row.get('load'), '.1f'):>5}", flush=True)


def summary(runs: dict[str, list[dict]]) -> None:
    print(f"\n{'set':>14} {'final mAP@0.5':>14} {'COCO AP':>8} {'best':>6} {'minutes':>8} {'first >= 0.80':>16}")
    for name, rows in runs.items():
        if not rows:
            print(f"{name:>14} (no evaluation)")
            continue
        last, best = rows[-1], max(rows, key=lambda r: r["mAP"])
        first = next((r for r in rows if r["mAP"] >= TARGET), None)
        reach = "-" if first is None else f"epoch {first['epoch']} ({fmt(first['minutes'], '.1f')} min)"
        print(f"{name:>14} {last['mAP']:>14.4f} {fmt(last['AP'], '.4f'):>8} {best['mAP']:>6.3f} "
              f"{fmt(last['minutes'], '.1f'):>8} {reach:>16}")
        weakest = sorted(last["per_class"].items(), key=lambda kv: kv[1])[:2]
        if weakest:
            print(f"{'':>14} weakest classes at the end: " + ", ".join(f"{k} {v:.2f}" for k, v in weakest))


def train(config: Path, sets: list[str], out: Path, threads: int | None, minutes: float | None) -> subprocess.Popen:
    cmd = detkit("train", str(config), "-o", str(out), *[a for s in sets for a in ("--set", s)])
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def follow(procs: dict[str, tuple[subprocess.Popen, Path]], minutes: float | None) -> dict[str, list[dict]]:
    """Print each run's evaluations as they come; stop runs after ``minutes``."""
    start = time.time()
    rows: dict[str, list[dict]] = {name: [] for name in procs}
    stopped: set[str] = set()
    while True:
        running = [name for name, (p, _) in procs.items() if p.poll() is None]
        for name, (_, out) in procs.items():
            new = eval_rows(out, start)[len(rows[name]):]
            for row in new:
                row["load"] = os.getloadavg()[0]
                rows[name].append(row)
                print_row(name, row)
        if not running:
            break
        if minutes is not None and time.time() - start > minutes * 60:
            for name in running:
                if name not in stopped:
                    procs[name][0].send_signal(signal.SIGTERM)  # checkpoint, then exit 143
                    stopped.add(name)
                    print(f"{name}: stopped after {minutes:g} minutes", flush=True)
        time.sleep(5)
    for name, (p, out) in procs.items():
        (out / "curve.json").write_text(json.dumps(rows[name], indent=1))
        if p.returncode and name not in stopped:
            print(f"{name}: detkit train exited {p.returncode}\n" + p.stderr.read()[-2000:], file=sys.stderr)
    return rows


HEADER = f"{'set':>14} {'epoch':>5} {'minutes':>8} {'mAP@0.5':>8} {'COCO AP':>8} {'load':>5}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", help="tiny, resnet50_gn, or a config path")
    ap.add_argument("--data", type=Path, default=TMP / "detkit_clutter", help="the clutter set (written if missing)")
    ap.add_argument("--heldout", type=Path, default=TMP / "detkit_heldout", help="the held-out set (written if missing)")
    ap.add_argument("--only", choices=["clutter", "heldout"], default=None, help="train on one set only")
    ap.add_argument("--parallel", action="store_true", help="both sets at once (one thread each unless --threads)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data sets")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--baseline", action="store_true", help="the untuned quickstart-at-480px recipe instead")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--minutes", type=float, default=None, help="stop each run after this many minutes")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of each run (on a crowded CPU, 1 beats 2: threads that wait spin)")
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                    help="print the curves of finished (or running) run directories instead of training")
    args = ap.parse_args()

    if args.report:
        print(HEADER)
        runs = {}
        for run_dir in args.report:
            runs[run_dir.name] = eval_rows(run_dir)
            for row in runs[run_dir.name]:
                print_row(run_dir.name, row)
        summary(runs)
        return 0
    if args.recipe is None:
        ap.error("a recipe (or --report RUN_DIR ...) is needed")
    config = Path(args.recipe)
    if not config.suffix:
        config = ROOT / "configs" / "scratch" / f"{args.recipe}.yaml"
    if args.baseline:
        config = ROOT / "configs" / "quickstart.yaml"
    wanted = [args.only] if args.only else ["clutter", "heldout"]
    classes = {"clutter": lambda: ensure_clutter(args.data, args.seed),
               "heldout": lambda: ensure_heldout(args.heldout, args.seed)}
    roots = {"clutter": args.data, "heldout": args.heldout}
    out = args.out or Path(tempfile.mkdtemp(prefix="scratch_"))
    common = ["eval.metric=[voc, coco]"]
    threads = args.threads if args.threads or not args.parallel else 1
    plans = {name: data_sets(config, roots[name], classes[name](), args.baseline) + common + args.overrides
             for name in wanted}
    print(HEADER, flush=True)
    results: dict[str, list[dict]] = {}
    if args.parallel:
        procs = {name: (train(config, sets, out / name, threads, args.minutes), out / name)
                 for name, sets in plans.items()}
        results = follow(procs, args.minutes)
    else:
        for name, sets in plans.items():
            results.update(follow({name: (train(config, sets, out / name, threads, args.minutes), out / name)},
                                  args.minutes))
    summary(results)
    print(f"runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
