"""Soak test: train the quickstart config for a long time and watch resident memory.

Runs ``detkit train configs/quickstart.yaml`` (evaluation every epoch, as many
epochs as fit) in a child process for ``--minutes`` (default 30), samples the
resident set size (RSS) of the child and its DataLoader workers every
``--sample`` seconds, prints one line per minute, and at the end compares the
peak with the value right after the first epoch's evaluation.  The check
passes when the peak stays within ``--tolerance`` (default 10 %) of that value;
the exit code is 0 on pass, 1 on fail, 2 when the run never finished an epoch.

The run is stopped with SIGTERM (detkit saves ``last.pt`` and exits 143).
Linux only (reads ``/proc``).  Run by hand; record the figures, the machine
and its load in benchmarks/README.md::

    .venv/bin/python benchmarks/soak.py                  # 30 minutes
    .venv/bin/python benchmarks/soak.py --minutes 5 --set data.train.num_images=200
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

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (DataLoader workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants in MiB (0 once it is gone)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def first_eval_done(metrics: Path) -> bool:
    if not metrics.exists():
        return False
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "eval":
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--epochs", type=int, default=200, help="more than fit in the time (the run is stopped)")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed peak growth over the first-epoch value")
    ap.add_argument("--set", action="append", default=[], help="extra --set overrides for detkit train")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="detkit-soak-"))
    out.parent.mkdir(parents=True, exist_ok=True)  # the log is written beside the run directory
    cmd = [sys.executable, "-m", "detkit.cli", "train", args.config, "--out", str(out), "--overwrite",
           "--set", f"train.epochs={args.epochs}", "--set", "eval.interval=1"]
    for s in args.set:
        cmd += ["--set", s]
    print("command:", " ".join(cmd), flush=True)
    log = open(out.parent / f"{out.name}.log", "w") if args.out else tempfile.TemporaryFile("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    samples: list[tuple[float, float]] = []  # (seconds, MiB)
    baseline: float | None = None
    baseline_t = 0.0
    next_report = 60.0
    print(f"{'minute':>6} {'RSS MiB':>9} {'peak MiB':>9}  epoch-1 value", flush=True)
    try:
        while time.monotonic() - t0 < args.minutes * 60 and proc.poll() is None:
            time.sleep(args.sample)
            now, mib = time.monotonic() - t0, rss_mib(proc.pid)
            samples.append((now, mib))
            if baseline is None and first_eval_done(out / "metrics.jsonl"):
                baseline, baseline_t = mib, now
                print(f"first epoch evaluated after {now / 60:.1f} min: {mib:.0f} MiB", flush=True)
            if now >= next_report:
                peak = max(m for _, m in samples)
                base = f"{baseline:.0f}" if baseline is not None else "-"
                print(f"{now / 60:6.1f} {mib:9.0f} {peak:9.0f}  {base}", flush=True)
                next_report += 60.0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    if proc.returncode not in (143, 0, None):
        print(f"training exited with {proc.returncode} before the time was up", flush=True)
    if baseline is None:
        print("no epoch finished: no first-epoch value to compare with", flush=True)
        return 2
    peak = max(m for t, m in samples if t >= baseline_t)
    ratio = peak / baseline
    ok = ratio <= 1 + args.tolerance
    print(f"after the first epoch {baseline:.0f} MiB, peak {peak:.0f} MiB: ratio {ratio:.3f} "
          f"(limit {1 + args.tolerance:.2f}) -> {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
