"""Data-parallel training on CPU with the gloo backend (two processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detkit.engine.distributed import average_gradients, broadcast_parameters

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights per rank...
    model = torch.nn.Linear(3, 1)
    broadcast_parameters(model)  # ...until rank 0's are broadcast
    average_gradients(model, 2)
    x = torch.full((1, 3), float(rank + 1))  # rank 0 sees 1s, rank 1 sees 2s
    model(x).sum().backward()
    torch.save({"weight": model.weight.detach().clone(), "grad": model.weight.grad.clone()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_averaged_and_weights_start_equal(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weight"], r1["weight"])
    # d(w.x)/dw = x: the mean of the ranks' inputs, 1.5, on both ranks.
    assert torch.allclose(r0["grad"], torch.full((1, 3), 1.5)) and torch.equal(r0["grad"], r1["grad"])


def test_torchrun_trains_with_two_processes(tmp_path):
    src = (REPO / "tests" / "engine" / "test_train.py").read_text()
    tiny = src[src.index('TINY = """') + 10 : src.index('"""\n\n\n@pytest.fixture')]
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "detkit.cli", "train", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 8 images, batch 4 per process, 2 processes: one step per epoch, logged once (by rank 0).
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    assert proc.stdout.count("done in") == 1  # only rank 0 reports
