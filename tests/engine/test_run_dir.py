"""Run directories: one training per directory (the lock), and where a resumed run trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.logging import read_metrics
from detkit.engine.run_lock import LOCK_NAME, RunLock
from detkit.engine.train import train
from detkit.errors import RunDirectoryError

@pytest.fixture
def tiny_config(tiny_dict, write_tiny):
    """The shared tiny config (tests/conftest.py), one epoch, no evaluation."""
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["eval"]["interval"] = 0
    return write_tiny(tiny_dict)


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _hold_lock_in_a_process(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from detkit.engine.run_lock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------ the lock
def test_a_second_training_into_a_held_directory_is_refused_even_with_overwrite(tiny_config, tmp_path):
    run_dir = train(load_config(tiny_config), out_dir=tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with RunLock(run_dir):  # a training still running there
        for overwrite in (False, True):
            with pytest.raises(RunDirectoryError) as info:
                train(load_config(tiny_config), out_dir=run_dir, resume=run_dir / "last.pt", overwrite=overwrite)
            line = str(info.value)
            assert f"PID {os.getpid()}" in line and "another training is running" in line and "\n" not in line
        with pytest.raises(RunDirectoryError):  # the lock itself, not only the early check
            RunLock(run_dir).acquire()
        # nothing of the holder's run was touched
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK_NAME} == before
    assert RunDirectoryError.exit_code == 2


def test_the_cli_names_the_holders_pid_and_a_killed_holders_lock_is_taken_over(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from detkit.cli import app

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _hold_lock_in_a_process(run_dir)
    try:
        result = CliRunner().invoke(app, ["train", str(tiny_config), "--out", str(run_dir)])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith(f"error: {run_dir}: another training is running") and "\n" not in line
        assert f"PID {holder.pid} on " in line
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up runs, the lock file stays
        holder.wait()
    assert (run_dir / LOCK_NAME).exists()
    result = CliRunner().invoke(app, ["train", str(tiny_config), "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"took over the lock of a training that no longer runs (PID {holder.pid}" in result.output
    assert steps(run_dir) == [1, 2]
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of a normal run


def test_the_lock_is_released_when_the_run_fails(tiny_config, tmp_path, monkeypatch):
    from detkit.engine import train as train_mod

    def interrupted(self, batches, micro_batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.TrainLoop, "optimizer_step", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(tiny_config), out_dir=run_dir)
    assert run_dir.is_dir() and not (run_dir / LOCK_NAME).exists()
    RunLock(run_dir).acquire().release()  # free for the next run


# ------------------------------------------------------------------ resume
def test_resume_continues_in_the_checkpoints_directory_as_the_refusal_recommends(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train.out_dir (runs/{name}) would be created here
    run_dir = train(load_config(tiny_config), out_dir=tmp_path / "mine")
    with pytest.raises(RunDirectoryError) as info:
        train(load_config(tiny_config, ["train.epochs=2"]), out_dir=run_dir)
    command = re.search(r"continue it with --resume (\S+),", str(info.value)).group(1)
    assert command == str(run_dir / "last.pt")
    train(load_config(tiny_config, ["train.epochs=2"]), resume=Path(command))  # no --out
    assert steps(run_dir) == [1, 2, 3, 4]
    assert load_checkpoint(run_dir / "last.pt")["step"] == 4
    assert not (tmp_path / "runs").exists()


def test_resume_into_another_directory_holding_a_run_is_refused(tiny_config, tmp_path):
    a = train(load_config(tiny_config), out_dir=tmp_path / "a")
    b = train(load_config(tiny_config), out_dir=tmp_path / "b")
    before = (b / "last.pt").read_bytes()
    with pytest.raises(RunDirectoryError, match=r"already holds a run"):
        train(load_config(tiny_config, ["train.epochs=2"]), out_dir=b, resume=a / "last.pt")
    assert (b / "last.pt").read_bytes() == before


def _summary(capsys) -> tuple[str, list[Path]]:
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done in"))
    return line, [Path(p) for p in re.findall(r"(/\S+?\.(?:pt|png))\b", line)]


def test_every_path_the_summary_names_exists(tiny_config, tmp_path, capsys):
    a = train(load_config(tiny_config, ["eval.interval=1"]), out_dir=tmp_path / "a")
    line, named = _summary(capsys)
    assert set(named) == {a / "last.pt", a / "best.pt", a / "losses.png"} and all(p.is_file() for p in named), line
    # Resumed into a new directory with nothing left to train: its best score comes
    # from the checkpoint, but neither best.pt nor last.pt exist there.
    b = train(load_config(tiny_config, ["eval.interval=1"]), out_dir=tmp_path / "b", resume=a / "last.pt")
    line, named = _summary(capsys)
    assert all(p.is_file() for p in named), line
    assert "best.pt" not in line and "last.pt" not in line and "no checkpoint written" in line
    assert not (b / "best.pt").exists()
