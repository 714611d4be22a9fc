"""A mid-epoch resume continues at the next sample, counted in samples: also with another batch size or
accumulation, and every training image is seen each epoch under torchrun (padded shares)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from rich.console import Console

from detkit.data.loader import EpochSampler
from detkit.engine import train as train_mod
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.distributed import DistInfo
from detkit.engine.train import TrainLoop, train
from detkit.errors import ConfigError
from test_hooks import toy_config, toys  # noqa: F401  (the toy detector, trainer and stop_at hook)


@pytest.fixture
def seen(monkeypatch):
    """``(epoch, image id)`` of every sample the loop trains on, in order."""
    trained: list[tuple[int, str]] = []
    real = TrainLoop.batches

    def batches(self, epoch, skip_steps=0):
        for batch in real(self, epoch, skip_steps):  # recorded as the loop takes each batch
            trained.extend((self.epoch, i) for i in batch.image_ids)
            yield batch

    monkeypatch.setattr(TrainLoop, "batches", batches)
    return trained


def _cfg(tmp_path, *overrides):
    return toy_config(tmp_path, "data.train.num_images=12", "train.epochs=2", *overrides)


def _epoch(trained, epoch):
    return [i for e, i in trained if e == epoch]


@pytest.mark.parametrize("first, then", [
    (["data.batch_size=4"], ["data.batch_size=2"]),  # fewer per batch: 8 left, not 8 - 2 * 2
    (["data.batch_size=2"], ["data.batch_size=3"]),
    (["data.batch_size=2"], ["data.batch_size=2", "train.accumulate=2"]),
    (["data.batch_size=2", "train.accumulate=2"], ["data.batch_size=2"]),
], ids=["batch-4-to-2", "batch-2-to-3", "accumulate-1-to-2", "accumulate-2-to-1"])
def test_a_resume_with_other_batches_trains_exactly_the_rest_of_the_epoch(toys, tmp_path, seen, first, then):
    straight = train(_cfg(tmp_path, *first), out_dir=tmp_path / "straight")
    order = _epoch(seen, 0)
    assert sorted(order) == sorted(set(order)) and len(order) == 12  # the epoch: each image once
    seen.clear()
    split = train(_cfg(tmp_path, *first, "train.hooks=[{type: stop_at, step: 1}]"), out_dir=tmp_path / "split")
    saved = load_checkpoint(split / "last.pt")
    assert saved["epoch"] == 0 and saved["epoch_step"] == 1 and 0 < saved["epoch_samples"] < 12
    done = _epoch(seen, 0)
    assert len(done) == saved["epoch_samples"]
    seen.clear()
    train(_cfg(tmp_path, *then), out_dir=split, resume=split / "last.pt")
    # The rest of epoch 0 in the epoch's own order, then a whole epoch 1.
    assert done + _epoch(seen, 0) == order
    assert Counter(_epoch(seen, 1)) == Counter(order)
    assert load_checkpoint(split / "last.pt")["epoch"] == 2
    assert straight.exists()


def test_two_resumes_with_different_batches_still_cover_the_epoch_once(toys, tmp_path, seen):
    train(_cfg(tmp_path, "data.batch_size=2"), out_dir=tmp_path / "straight")
    order = _epoch(seen, 0)
    seen.clear()
    run = tmp_path / "run"
    train(_cfg(tmp_path, "data.batch_size=4", "train.hooks=[{type: stop_at, step: 1}]"), out_dir=run)
    # resumed with batch 2 and stopped again inside the epoch, then resumed with batch 3
    train(_cfg(tmp_path, "data.batch_size=2", "train.hooks=[{type: stop_at, step: 3}]"), out_dir=run,
          resume=run / "last.pt")
    second = load_checkpoint(run / "last.pt")
    assert second["epoch"] == 0 and second["epoch_samples"] == 8
    assert [s["batch_size"] for s in second["epoch_progress"]] == [4, 2]
    train(_cfg(tmp_path, "data.batch_size=3"), out_dir=run, resume=run / "last.pt")
    assert _epoch(seen, 0) == order


def test_unchanged_settings_keep_one_segment_and_the_uninterrupted_order(toys, tmp_path, seen):
    run = tmp_path / "run"
    train(_cfg(tmp_path, "data.batch_size=2", "train.hooks=[{type: stop_at, step: 2}]"), out_dir=run)
    train(_cfg(tmp_path, "data.batch_size=2", "train.hooks=[{type: stop_at, step: 4}]"), out_dir=run,
          resume=run / "last.pt")
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch_progress"] == [{"world_size": 1, "batch_size": 2, "grouped": False, "samples": 8}]


def test_a_step_capped_epoch_with_another_batch_size_is_refused_in_one_line(toys, tmp_path):
    run = tmp_path / "run"
    cap = "train.max_iters_per_epoch=2"
    train(_cfg(tmp_path, "data.batch_size=4", cap, "train.hooks=[{type: stop_at, step: 1}]"), out_dir=run)
    with pytest.raises(ConfigError) as info:
        train(_cfg(tmp_path, "data.batch_size=2", cap), out_dir=run, resume=run / "last.pt")
    line = str(info.value)
    assert "\n" not in line and "data.batch_size 4 -> 2" in line and "train.max_iters_per_epoch 2" in line
    train(_cfg(tmp_path, "data.batch_size=4", cap), out_dir=run, resume=run / "last.pt")  # the same: fine
    assert load_checkpoint(run / "last.pt")["step"] == 4


# ------------------------------------------------------------ distributed
def test_every_training_image_is_seen_each_epoch_by_two_processes(toys, tmp_path):
    # 12 images, batch 4, 2 processes: 6 per rank, so batches of 4 and 2 (dropping the
    # short one would train 8 of the 12).
    cfg = _cfg(tmp_path, "data.batch_size=4")
    ids = []
    for rank in (0, 1):
        loop = TrainLoop(cfg, tmp_path / "run", Console(quiet=True), torch.device("cpu"), DistInfo(rank, 2))
        assert loop.epoch_steps == [2, 2]
        for epoch in (0, 1):
            batches = list(loop.batches(epoch))
            assert [len(b) for b in batches] == [4, 2]
            ids += [(epoch, i) for b in batches for i in b.image_ids]
    names = {i for _, i in ids}
    assert len(names) == 12 and all(Counter(_epoch(ids, e)) == Counter(names) for e in (0, 1))


def test_an_uneven_split_pads_by_repeating_samples():
    # 11 samples on 2 ranks: one sample is trained twice, none left out.
    shares = [list(EpochSampler(11, True, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 6
    assert set(i for s in shares for i, _ in s) == set(range(11))


def test_a_resume_with_another_number_of_processes_shares_out_the_rest():
    # Saved by 2 ranks after 2 samples each (batch 2); resumed by 1 process and by 3.
    full = [list(EpochSampler(12, True, seed=1, num_replicas=2, rank=r, batch_size=2)) for r in (0, 1)]
    trained = [i for share in full for i, _ in share[:2]]
    segments = [{"world_size": 2, "batch_size": 2, "grouped": False, "samples": 2}]
    for world in (1, 3):
        rest = [i for r in range(world)
                for i, _ in EpochSampler(12, True, seed=1, num_replicas=world, rank=r, batch_size=4).remaining(0, segments)]
        # each untrained sample once; with 3 ranks the 8 left are padded to 9 by one repeat
        assert set(trained + rest) == set(range(12)) and len(rest) == -(-8 // world) * world, world
        assert sorted(set(rest)) == sorted(set(range(12)) - set(trained))


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_shares_resume_in_the_uninterrupted_order_and_cover_the_epoch_with_another_batch(world):
    groups = [i % 3 for i in range(24)]  # three aspect-ratio groups
    make = lambda rank, batch: EpochSampler(24, True, seed=2, num_replicas=world, rank=rank,  # noqa: E731
                                            group_ids=groups, batch_size=batch)
    for rank in range(world):
        full = list(make(rank, 4))
        saved = [{"world_size": world, "batch_size": 4, "grouped": True, "samples": 4}]
        assert make(rank, 4).remaining(0, saved) == full[4:]  # unchanged: the same order as straight on
    trained = [i for r in range(world) for i, _ in list(make(r, 4))[:4]]
    saved = [{"world_size": world, "batch_size": 4, "grouped": True, "samples": 4}]
    rest = [i for r in range(world) for i, _ in make(r, 3).remaining(0, saved)]
    assert sorted(trained + rest) == list(range(24))
