"""Two "nodes" on 127.0.0.1: two torchrun agents (--nnodes 2, one process each) train together.

Each agent is started as it would be on its own machine (c10d rendezvous at
one endpoint, the same run id); they share the data (synthetic here) but not
the output directory: only global rank 0, on the first node, writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SRC = (REPO / "tests" / "engine" / "test_train.py").read_text()
TINY = SRC[SRC.index('TINY = """') + 10 : SRC.index('"""\n\n\n@pytest.fixture')]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_a_few_steps_together(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex[:8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
               "--max-restarts", "0", "-m", "detkit.cli", "train", str(config),
               "--out", str(tmp_path / f"node{node}"), "--set", "train.epochs=1"]
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=300)
            outputs.append((agent.returncode, out, err))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
    # c10d rendezvous gives rank 0 to either agent: exactly one node wrote the run.
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if d.exists()]
    assert len(written) == 1, written
    run = written[0]
    text = "".join(out for _, out, _ in outputs)
    assert "x 2 processes" in text and text.count("done in") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 images, batch 4 per process, 2 processes: one step per epoch.
    assert [r["step"] for r in records if r["type"] == "train"] == [1]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
