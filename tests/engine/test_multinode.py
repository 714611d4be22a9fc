"""Two "nodes" on 127.0.0.1: two torchrun agents (--nnodes 2, one process each) train together.

Each agent is started as it would be on its own machine (c10d rendezvous at
one endpoint with the same run id, or static rendezvous with node ranks); they share the data (synthetic here) but not
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



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_train_a_few_steps_together(tmp_path, tiny_config, rendezvous):
    config = tiny_config
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex[:8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in (0, 1):
        if rendezvous == "c10d":  # the same command on both nodes
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
        else:  # fixed node ranks: node 0 holds global rank 0
            host, port = endpoint.split(":")
            where = ["--node-rank", str(node), "--master-addr", host, "--master-port", port]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *where,
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
    # Exactly one node wrote the run: with c10d rendezvous either, with static ranks node 0.
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if d.exists()]
    assert len(written) == 1, written
    if rendezvous == "static":
        assert written == [tmp_path / "node0"]
    run = written[0]
    text = "".join(out for _, out, _ in outputs)
    assert "x 2 processes" in text and text.count("done in") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 images, batch 4 per process, 2 processes: one step per epoch.
    assert [r["step"] for r in records if r["type"] == "train"] == [1]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
