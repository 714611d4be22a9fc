"""Issue 9: faults around a training run (torn metrics, run directories, SIGTERM, divergence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.logging import read_metrics, trim_metrics
from detkit.engine.train import train

@pytest.fixture
def tiny_config(tiny_dict, write_tiny):
    """The shared tiny config for one epoch (2 steps) without evaluation: these tests are about the run's files."""
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["eval"] = {"interval": 0}
    return write_tiny(tiny_dict)


def steps(run_dir: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind]


# ----------------------------------------------------------------- case 2
def test_read_metrics_skips_a_torn_line_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n{"type": "tra')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: skipped unparsable line\(s\) 3"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert trim_metrics(path, 1) == 2  # step 2 and the torn line
    assert path.read_text() == '{"type": "train", "step": 1}\n'


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tiny_config, tmp_path):
    run_dir = train(load_config(tiny_config), out_dir=tmp_path / "run")
    assert load_checkpoint(run_dir / "last.pt")["step"] == 2
    # What a kill -9 during step 4 of a longer run leaves: steps 3-4 logged past the
    # checkpoint, and half a line.
    with open(run_dir / "metrics.jsonl", "a") as fh:
        for step in (3, 4):
            fh.write(json.dumps({"type": "train", "epoch": 1, "step": step, "total": 1.0}) + "\n")
        fh.write('{"type": "train", "epoch": 1, "st')
    train(load_config(tiny_config, ["train.epochs=2"]), out_dir=run_dir, resume=run_dir / "last.pt")
    assert steps(run_dir) == [1, 2, 3, 4]  # each step once, nothing torn
    assert (run_dir / "losses.png").exists()


# ----------------------------------------------------------------- case 6
def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from detkit.cli import app
    from detkit.errors import RunDirectoryError

    run_dir = train(load_config(tiny_config), out_dir=tmp_path / "run")
    before = (run_dir / "last.pt").read_bytes()
    result = CliRunner().invoke(app, ["train", str(tiny_config), "--out", str(run_dir)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: {run_dir}: already holds a run (last.pt)") and "\n" not in line
    assert f"--resume {run_dir / 'last.pt'}" in line and "--out" in line and "--overwrite" in line
    assert (run_dir / "last.pt").read_bytes() == before and steps(run_dir) == [1, 2]
    with pytest.raises(RunDirectoryError):
        train(load_config(tiny_config), out_dir=run_dir)
    train(load_config(tiny_config), out_dir=run_dir, overwrite=True)
    assert steps(run_dir) == [1, 2]  # replaced, not appended


def test_a_failed_start_leaves_no_run_directory(tiny_config, tmp_path):
    from detkit.errors import DataError

    run_dir = tmp_path / "runs" / "x"
    cfg = load_config(tiny_config, [f"data.train={{type: voc, root: {tmp_path / 'nowhere'}}}"])
    with pytest.raises(DataError):
        train(cfg, out_dir=run_dir)
    assert not run_dir.exists() and not run_dir.parent.exists()


def test_stale_temporary_files_are_removed_on_the_next_start(tiny_config, tmp_path, capsys):
    run_dir = train(load_config(tiny_config), out_dir=tmp_path / "run")
    stale = run_dir / ".last.pt.k2j3h4.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    train(load_config(tiny_config, ["train.epochs=2"]), out_dir=run_dir, resume=run_dir / "last.pt")
    assert not stale.exists()
    assert "removed 1 unfinished temporary file(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- case 12
def _train_then_sigterm(tiny_config, tmp_path, extra):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "detkit.cli", "train", str(tiny_config), "--out", str(run_dir),
         "--set", "train.epochs=200", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "last.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out, run_dir


@pytest.mark.slow
def test_sigterm_saves_the_current_step_when_iteration_checkpoints_are_on(tiny_config, tmp_path):
    rc, out, run_dir = _train_then_sigterm(tiny_config, tmp_path, ["--set", "train.checkpoint_every_iters=50"])
    assert rc == 143, out
    line = next(line for line in out.splitlines() if "SIGTERM" in line)
    assert line.startswith("stopped at step ") and f"{run_dir / 'last.pt'} holds this step" in line
    step = int(line.split()[3].rstrip(":"))
    assert load_checkpoint(run_dir / "last.pt")["step"] == step  # saved before exiting, not at step 50
    assert "Traceback" not in out


@pytest.mark.slow
def test_sigterm_without_iteration_checkpoints_is_like_ctrl_c(tiny_config, tmp_path):
    rc, out, run_dir = _train_then_sigterm(tiny_config, tmp_path, [])
    assert rc == 143, out
    line = next(line for line in out.splitlines() if "SIGTERM" in line)
    assert line.startswith("interrupted by SIGTERM at step ")
    assert f"{run_dir / 'last.pt'} holds step" in line and "--resume" in line
    assert "Traceback" not in out


# ---------------------------------------------------------------- case 11
def test_a_diverging_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    from detkit.engine.train import TrainLoop
    from detkit.errors import DetkitError

    optimizer_step = TrainLoop.optimizer_step

    def diverging(self, batches, n):
        losses = optimizer_step(self, batches, n)
        if self.step >= 2:  # from step 3 on: finite but absurd, as with a too-high LR
            losses = {k: v * 0 + 1e25 for k, v in losses.items()}
        return losses

    monkeypatch.setattr(TrainLoop, "optimizer_step", diverging)
    cfg = load_config(tiny_config, ["train.epochs=3", "train.log_interval=2", "train.checkpoint_every_iters=1",
                                    "train.loss_guard={max_ratio: 10, history: 1}"])
    with pytest.raises(DetkitError) as info:
        train(cfg, out_dir=tmp_path / "run")
    msg = str(info.value)
    assert msg.startswith("loss 1e+25 is over 10x the recent median") and "at step 3" in msg
    assert "lower train.optimizer.lr" in msg  # the same advice as for a NaN
    assert f"{tmp_path / 'run' / 'last.pt'} keeps step 2" in msg
    # Step 3 was not a log point, but it was due for a checkpoint: the guard ran first.
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


def test_the_divergence_guard_is_on_by_default():
    from detkit.sections import TrainConfig

    assert TrainConfig().loss_guard.max_ratio == 1000
