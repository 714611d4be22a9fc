"""Data-parallel training and evaluation on CPU with the gloo backend (two processes).

The equivalence tests build the detector in each process (``mp.spawn``) and
compare with the same computation in this process:

* DDP over 2 processes x 2 images equals one process stepping on the same 4
  images as 2 accumulated micro-batches of 2 (``train.accumulate: 2``).  It does
  not equal one forward pass over the 4 images exactly: the box losses divide
  by the positives of each process's batch (not of the global batch), and the
  target creators draw their random samples per batch.  Both match here
  because the micro-batches are the ranks' batches and each draws from the
  same seeded generator state.
* Sharded evaluation gathered on rank 0 equals one process's evaluation exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from detkit.config import load_config
from detkit.engine.distributed import (
    DistInfo,
    DistributedHook,
    convert_sync_batchnorm,
    evaluate_distributed,
    gather_results,
    shutdown,
    wrap_for_training,
)

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> DistInfo:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return DistInfo(rank, 2, 0)


# ------------------------------------------------------------- plain modules
class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).sum()


def _worker_phases(rank: int, port: int, out: str) -> None:
    info = _join(rank, port)
    torch.manual_seed(rank)  # different initial weights per rank, until DDP broadcasts rank 0's
    module = _TwoLayers()
    loop = types.SimpleNamespace(trainer=types.SimpleNamespace(module=module), model=module, dist=info,
                                 device=torch.device("cpu"), console=Console(quiet=True))
    hook = DistributedHook()
    hook.loop = loop
    hook.before_train()
    x = torch.full((1, 3), float(rank + 1))  # rank 0 sees 1s, rank 1 sees 2s
    grads = []
    for frozen in (False, True, False):  # trainable, "frozen backbone" (layer a), trainable again
        for p in module.a.parameters():
            p.requires_grad_(not frozen)
        hook.before_step()
        module.zero_grad(set_to_none=True)
        loop.trainer.module(x).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    torch.save({"weights": {k: v.clone() for k, v in module.state_dict().items()}, "grads": grads,
                "wrapper": type(loop.trainer.module).__name__}, f"{out}/{rank}.pt")
    hook.after_train()  # drops the DDP wrapper, which holds the process group
    shutdown(info)


@pytest.mark.slow
def test_ddp_averages_gradients_in_every_phase_and_starts_from_rank0(tmp_path):
    mp.spawn(_worker_phases, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["wrapper"] == "DistributedDataParallel"
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # broadcast from rank 0 at wrapping
    assert [sorted(g) for g in r0["grads"]] == [["a.bias", "a.weight", "b.bias", "b.weight"],
                                                ["b.bias", "b.weight"],
                                                ["a.bias", "a.weight", "b.bias", "b.weight"]]
    # d(sum(b(a x)))/d(b.weight) = a(x): averaged over the ranks' inputs, in all three phases.
    a = torch.nn.Linear(3, 3)
    a.load_state_dict({"weight": r0["weights"]["a.weight"], "bias": r0["weights"]["a.bias"]})
    with torch.no_grad():
        expected = (a(torch.full((1, 3), 1.0)) + a(torch.full((1, 3), 2.0))) / 2
    for g0, g1 in zip(r0["grads"], r1["grads"]):
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
        torch.testing.assert_close(g0["b.weight"], expected)


def test_wrap_is_the_trainer_itself_when_alone():
    module = _TwoLayers()
    assert wrap_for_training(module, DistInfo(), torch.device("cpu")) is module


def test_sync_bn_converts_trainable_batchnorm_only_and_keeps_its_tensors():
    from detkit.interfaces import freeze_batchnorm

    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model = torch.nn.Sequential(frozen, torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))

    class Frozen(torch.nn.Module):  # freezing that survives train(), as the backbones do it
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def train(self, mode: bool = True):
            super().train(mode)
            freeze_batchnorm(self.inner)
            return self

    model[0] = Frozen(frozen)
    weight, mean = model[2].weight, model[2].running_mean
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()  # as DistributedHook does: a frozen BatchNorm shows in its mode
    assert convert_sync_batchnorm(model) == 1
    assert type(model[2]) is torch.nn.SyncBatchNorm and type(model[0].inner[1]) is torch.nn.BatchNorm2d
    assert model[2].weight is weight and model[2].running_mean is mean  # the optimizer still holds them
    assert any(p is model[2].weight for p in optimizer.param_groups[0]["params"])


def test_sync_bn_on_cpu_processes_is_a_config_error():
    from detkit.errors import ConfigError

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    hook = DistributedHook(sync_bn=True)
    hook.loop = types.SimpleNamespace(trainer=types.SimpleNamespace(module=module), model=module, dist=DistInfo(0, 2),
                                      device=torch.device("cpu"), console=Console(quiet=True))
    with pytest.raises(ConfigError, match="train.sync_bn: SyncBatchNorm needs CUDA"):
        hook.before_train()
    assert type(module[1]) is torch.nn.BatchNorm2d


# ------------------------------------------------------------ the detector
def _build(config: str):
    from detkit.engine.optim import build_optimizer
    from detkit.registry import registry

    cfg = load_config(config)
    torch.manual_seed(0)
    model = registry("detector").build(cfg.model, num_classes=4)
    optimizer = build_optimizer(model, cfg.train.optimizer)
    trainer = registry("trainer").build(cfg.train.trainer, model=model, optimizer=optimizer)
    return cfg, model, trainer


def _global_batch(cfg):
    from detkit.data.loader import build_dataset

    data = build_dataset(cfg.data, "train", augment=False)
    return [data[i] for i in range(4)]


def _micro_batch(samples):
    """(images, targets) of loader samples, as the loop hands them to ``trainer.run_step``."""
    from detkit.data.collate import Collate

    b = Collate(uint8=True)(samples)
    return b.images, b.targets


def _seed_each_forward(model, seed: int) -> None:
    """Reseed torch before every forward of the detector: each micro-batch (one per rank, or one
    after the other in one process) draws its anchor and RoI samples from the same state."""
    def reseed(module, args) -> None:  # returns None: the inputs stay as they are
        torch.manual_seed(seed)

    if hasattr(model, "_seed_hook"):
        model._seed_hook.remove()
    model._seed_hook = model.register_forward_pre_hook(reseed)


def _freeze(model, frozen: bool) -> None:
    """The frozen-backbone phase as FrozenBackboneHook switches it (frozen BatchNorm stays frozen)."""
    if not hasattr(model, "_trainable"):
        model._trainable = {id(p): p.requires_grad for p in model.backbone_parameters()}
    for p in model.backbone_parameters():
        p.requires_grad_(False if frozen else model._trainable[id(p)])


def _worker_detector(rank: int, port: int, config: str, out: str) -> None:
    info = _join(rank, port)
    cfg, model, trainer = _build(config)
    model.train()
    samples = _global_batch(cfg)[2 * rank : 2 * rank + 2]  # this rank's half of the global batch of 4
    loop = types.SimpleNamespace(trainer=trainer, model=model, dist=info, device=torch.device("cpu"),
                                 console=Console(quiet=True))
    hook = DistributedHook()
    hook.loop = loop
    hook.before_train()
    losses = []
    for step in range(STEPS):
        _freeze(model, step == 0)  # the first step in the frozen-backbone phase
        hook.before_step()
        _seed_each_forward(model, 100 + step)  # seeded target sampling, the same state on both ranks
        losses.append(trainer.run_step([_micro_batch(samples)])["total"])
    torch.save({"weights": {k: v.clone() for k, v in model.state_dict().items()},
                "wrapper": type(trainer.module).__name__, "losses": losses}, f"{out}/{rank}.pt")
    hook.after_train()
    shutdown(info)


@pytest.fixture
def frozen_config(tiny_dict, write_tiny):
    """The shared tiny config with frozen BatchNorm: a batch of 2 per process would have other
    statistics than a batch of 4."""
    tiny_dict["model"]["backbone"]["norm"] = "frozen_bn"
    return str(write_tiny(tiny_dict, "frozen.yaml"))


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, frozen_config):
    mp.spawn(_worker_detector, args=(free_port(), frozen_config, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["wrapper"] == "DistributedDataParallel"
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k

    # One process, the same 4 images as 2 accumulated micro-batches (the ranks' halves).
    cfg, model, trainer = _build(frozen_config)
    model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    samples = _global_batch(cfg)
    for step in range(STEPS):
        _freeze(model, step == 0)
        _seed_each_forward(model, 100 + step)
        trainer.run_step([_micro_batch(samples[:2]), _micro_batch(samples[2:])])
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(v, start[k])
    assert moved > 10  # the comparison is about trained weights, backbone included
    trunk = [k for k in start if k.startswith("backbone.")]
    assert any(not torch.equal(model.state_dict()[k], start[k]) for k in trunk)


@pytest.mark.parametrize("frozen", [False, True])
def test_every_trainable_parameter_gets_a_gradient_so_ddp_needs_no_unused_search(frozen_config, frozen):
    # DDP is built with find_unused_parameters=False: a trainable parameter without a
    # gradient would stop the second step.  The frozen phase leaves the trunk out of DDP.
    cfg, model, trainer = _build(frozen_config)
    model.train()
    _freeze(model, frozen)
    samples = _global_batch(cfg)[:2]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.losses(*_micro_batch(samples))["total"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 5
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# ------------------------------------------------------------- evaluation
def _worker_eval(rank: int, port: int, config: str, out: str) -> None:
    info = _join(rank, port)
    cfg, model, loader = _eval_setup(config)
    results = [evaluate_distributed(model, loader, loader.dataset.classes, c, torch.device("cpu"), info)
               for c in _eval_configs(cfg)]
    # The gather itself over real processes: rank 0 holds items 0, 2, 4, rank 1 items 1, 3.
    gathered = gather_results([f"item {i}" for i in range(rank, 5, 2)], info)
    if rank == 0:
        torch.save({"results": results, "gathered": gathered}, f"{out}/result.pt")
    else:
        assert results == [None, None] and gathered is None
    shutdown(info)


def _eval_setup(config: str):
    from detkit.data.loader import build_dataset, build_loader

    cfg, model, _ = _build(config)
    val = build_dataset(cfg.data, "val")
    return cfg, model, build_loader(val, batch_size=2, shuffle=False)


def _eval_configs(cfg):
    return [cfg.eval, cfg.eval.model_copy(update={"max_images": 4})]


def _fake_gather(monkeypatch, shards):
    """``dist.gather_object`` on rank 0 of ``len(shards)`` processes that hold ``shards``."""
    def gather_object(obj, parts, dst=0):
        assert parts is not None and len(parts) == len(shards) and dst == 0
        parts[:] = [list(s) for s in shards]

    monkeypatch.setattr(dist, "gather_object", gather_object)


def test_shards_cover_each_image_once_and_the_gather_restores_the_loaders_order(frozen_config, monkeypatch):
    from detkit.engine.distributed import shard_loader

    _, _, loader = _eval_setup(frozen_config)  # 4 validation images
    # (index, augmentation seed) pairs; evaluation does not augment, the index is what counts.
    everything = [index for index, _ in loader.sampler]
    assert everything == [0, 1, 2, 3]
    for limit in (None, 3):
        shards = [[i for i, _ in shard_loader(loader, DistInfo(r, 3), limit).sampler] for r in range(3)]
        assert [len(s) for s in shards] == ([2, 1, 1] if limit is None else [1, 1, 1])
        # The real gather of evaluate_distributed, on rank 0 of 3 processes holding these shards.
        _fake_gather(monkeypatch, shards)
        assert gather_results(shards[0], DistInfo(0, 3)) == everything[:limit]


def test_gather_results_puts_rank_r_item_j_at_r_plus_j_world_and_none_off_rank0(monkeypatch):
    # Rank r's j-th result is item r + j * world: 7 items over 3 ranks are 3 + 2 + 2.
    shards = [["a0", "a3", "a6"], ["b1", "b4"], ["c2", "c5"]]
    _fake_gather(monkeypatch, shards)
    assert gather_results(shards[0], DistInfo(0, 3)) == ["a0", "b1", "c2", "a3", "b4", "c5", "a6"]
    monkeypatch.setattr(dist, "gather_object", lambda obj, parts, dst=0: None)
    assert gather_results(shards[1], DistInfo(1, 3)) is None
    assert gather_results(["x", "y"], DistInfo()) == ["x", "y"]  # alone: as they are


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(tmp_path, tiny_dict, write_tiny):
    # 7 images: the shards are uneven (4 + 3), nothing may be counted twice.
    tiny_dict["model"]["backbone"]["norm"] = "frozen_bn"
    tiny_dict["data"]["val"]["num_images"] = 7
    tiny_dict["eval"]["metric"] = ["voc", "coco"]
    config = write_tiny(tiny_dict)
    mp.spawn(_worker_eval, args=(free_port(), str(config), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "result.pt", weights_only=False)
    sharded = saved["results"]
    assert saved["gathered"] == [f"item {i}" for i in range(5)]

    from detkit.engine.evaluate import evaluate

    cfg, model, loader = _eval_setup(str(config))
    single = [evaluate(model, loader, loader.dataset.classes, c, torch.device("cpu")) for c in _eval_configs(cfg)]
    assert [r["images"] for r in single] == [7, 4]
    assert single[0]["metrics"]["voc/mAP"] > 0  # something is detected: the comparison is not of zeros
    for s, d in zip(single, sharded):
        assert d["images"] == s["images"]
        assert json.dumps(d["metrics"], sort_keys=True) == json.dumps(s["metrics"], sort_keys=True)  # exactly (NaN too)
        assert json.dumps(d["per_class"], sort_keys=True) == json.dumps(s["per_class"], sort_keys=True)


# ------------------------------------------------------------------ the CLI
def _torchrun(*args: str, launcher: str = "detkit", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if launcher == "detkit":
        cmd = [sys.executable, "-c", "from detkit.engine.distributed import launch_main; launch_main()"]
        cmd += ["--nproc-per-node", "2", "--master-port", str(free_port()), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "detkit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_torchrun_trains_with_two_processes_and_only_rank0_writes(tmp_path, tiny_config):
    config = tiny_config
    proc = _torchrun("train", str(config), "--out", str(tmp_path / "run"), launcher="torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 images, batch 4 per process, 2 processes: one step per epoch, logged once (by rank 0).
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    assert proc.stdout.count("done in") == 1  # only rank 0 reports
    names = {p.name for p in run.iterdir()}
    assert names >= {"best.pt", "config.yaml", "last.pt", "losses.png", "metrics.jsonl"}
    assert not [n for n in names if n.startswith(".") or "tmp" in n]  # no half-written files of a second writer
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_torchrun_eval_writes_what_one_process_writes(tmp_path, tiny_checkpoint):
    from detkit.engine.eval_checkpoint import evaluate_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "run" / "last.pt", ["circle", "square", "triangle", "cross"], confident=False)
    # 7 images: uneven shards (4 + 3); nothing may be counted twice or fall out of order.
    sets = ["--set", "data.val.num_images=7", "--set", "eval.metric=[voc, coco]"]
    proc = _torchrun("eval", str(ckpt), *sets, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted by 2 processes" in proc.stdout and proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    single = evaluate_checkpoint(ckpt, overrides=sets[1::2], out=tmp_path / "one", console=Console(quiet=True))
    assert single["images"] == 7 and single["metrics"]["voc/mAP"] > 0  # not a comparison of zeros
    rows = json.loads((tmp_path / "one" / "detections.json").read_text())
    assert len(rows) > 7 and len({r["image_id"] for r in rows}) == 7
    for name in ("detections.json", "metrics.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert {p.name for p in (tmp_path / "two").iterdir()} == {p.name for p in (tmp_path / "one").iterdir()}


def _failure(exitcode: int, timestamp: int = 0):
    import signal

    name = signal.Signals(-exitcode).name if exitcode < 0 else ""
    return types.SimpleNamespace(exitcode=exitcode, timestamp=timestamp, signal_name=lambda: name)


def test_the_launcher_exit_code_and_its_only_line(capsys):
    from detkit.engine.distributed import _report_failures

    # Rank 1 reported a config error (2), rank 0 then exited quietly (1), or was stopped by the agent.
    assert _report_failures({0: _failure(1, 5), 1: _failure(2, 5)}) == 2
    assert _report_failures({0: _failure(-15, 5), 1: _failure(2, 4)}) == 2
    assert capsys.readouterr().err == ""
    # Killed by the out-of-memory killer: it could not say so itself.
    assert _report_failures({0: _failure(-15), 1: _failure(-9)}) == 1
    assert capsys.readouterr().err == "error: the process of rank 1 was killed by SIGKILL\n"


def _broken_voc(tmp_path: Path, tiny_dict: dict, write_tiny) -> Path:
    """8 VOC images, one of them not an image: one rank fails on its shard, the other does not."""
    from detkit.data.export import export_synthetic
    from detkit.data.synthetic import SyntheticShapes

    synth = SyntheticShapes(SyntheticShapes.Params(num_images=8, image_size=(64, 64), split="train"))
    root = export_synthetic(tmp_path / "voc", "voc", synth)
    image = sorted((Path(root) / "JPEGImages").iterdir())[3]
    image.write_bytes(b"not an image")
    tiny_dict["data"]["train"] = {"type": "voc", "root": str(root), "split": "train",
                                  "classes": ["circle", "square", "triangle", "cross"]}
    return write_tiny(tiny_dict, "broken.yaml")


@pytest.mark.slow
def test_a_failure_on_one_rank_is_one_line(tmp_path, tiny_dict, write_tiny):
    config = _broken_voc(tmp_path, tiny_dict, write_tiny)
    proc = _torchrun("train", str(config), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot read image" in lines[0], proc.stderr
    # Plain torchrun: the ranks still print no traceback; torchrun adds its own failure report.
    proc = _torchrun("train", str(config), "--out", str(tmp_path / "run2"), launcher="torchrun")
    assert proc.returncode == 1
    assert proc.stderr.count("cannot read image") == 1
    assert "[rank" not in proc.stderr  # torchrun prefixes the workers' output lines; there are none


@pytest.mark.slow
def test_an_error_on_every_rank_is_reported_once(tmp_path, tiny_dict, write_tiny):
    # Every rank fails building its data set, after joining the group.
    tiny_dict["data"]["train"] = {"type": "voc", "root": str(tmp_path / "missing"), "split": "train"}
    config = write_tiny(tiny_dict)
    proc = _torchrun("train", str(config), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _worker_setup_error(rank: int, port: int, out: str) -> None:
    import time

    from detkit.engine.distributed import agree_on_setup_errors
    from detkit.errors import DataError

    info = _join(rank, port)
    try:
        with agree_on_setup_errors(info):
            if rank == 0:
                time.sleep(4)  # rank 0 fails later than the other's grace period would have waited
            raise DataError(f"missing data (rank {rank})")
    except BaseException as exc:  # noqa: BLE001  what each rank would hand the CLI
        Path(out, f"{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    shutdown(info)


@pytest.mark.slow
def test_a_setup_error_on_every_rank_is_raised_by_rank0_alone_however_late(tmp_path):
    mp.spawn(_worker_setup_error, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "0.txt").read_text() == "DataError: missing data (rank 0)"
    assert (tmp_path / "1.txt").read_text() == "SystemExit: 1"  # quiet: rank 0 reports
