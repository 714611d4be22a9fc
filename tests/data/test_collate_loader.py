from __future__ import annotations

import pytest
import torch

from detkit.data.collate import Collate, pad_images
from detkit.data.config import DataConfig
from detkit.data.loader import EpochSampler, TransformedDataset, build_dataset, build_loader
from detkit.errors import ConfigError


def _target(g: int) -> dict:
    return {
        "boxes": torch.arange(4 * g, dtype=torch.float32).reshape(g, 4),
        "labels": torch.arange(g),
        "difficult": torch.zeros(g, dtype=torch.bool),
        "image_id": f"im{g}",
        "scale": 0.5 * (g + 1),
        "orig_size": torch.tensor([10 * g + 1, 20]),
    }


def test_pad_images_zero_pads_and_rounds_up():
    a, b = torch.ones(3, 5, 7), torch.full((3, 9, 4), 0.5)
    images, sizes = pad_images([a, b], size_divisor=4)
    assert images.shape == (2, 3, 12, 8)
    assert sizes.tolist() == [[5, 7], [9, 4]] and sizes.dtype == torch.int64
    assert images[0, :, :5, :7].eq(1).all() and images[0, :, 5:].eq(0).all() and images[0, :, :, 7:].eq(0).all()
    assert images[1, :, :9, :4].eq(0.5).all() and images[1, :, :, 4:].eq(0).all()
    assert pad_images([a, b])[0].shape == (2, 3, 9, 7)


def test_collate_builds_batch():
    samples = [(torch.rand(3, 6, 8), _target(0)), (torch.rand(3, 10, 5), _target(2))]
    batch = Collate(size_divisor=16)(samples)
    assert batch.images.shape == (2, 3, 16, 16) and len(batch) == 2
    assert batch.image_sizes.tolist() == [[6, 8], [10, 5]]
    assert [b.shape[0] for b in batch.boxes] == [0, 2]
    assert batch.labels[1].tolist() == [0, 1] and batch.labels[1].dtype == torch.int64
    assert batch.scales.tolist() == [0.5, 1.5]
    assert batch.orig_sizes.tolist() == [[1, 20], [21, 20]]
    assert batch.image_ids == ["im0", "im2"]
    assert batch.targets[1]["boxes"] is batch.boxes[1]
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.image_ids == batch.image_ids
    # to_original undoes the resize: image 1 is 10x5 now, was 21x20.
    back = batch.to_original(torch.tensor([[1.0, 1.0, 5.0, 10.0]]), 1)
    assert torch.allclose(back, torch.tensor([[4.0, 2.1, 20.0, 21.0]]))


def test_epoch_sampler_reshuffles_and_is_reproducible():
    s = EpochSampler(10, shuffle=True, seed=1)
    e0, e1 = list(s), list(s)
    assert sorted(i for i, _ in e0) == list(range(10))
    assert [i for i, _ in e0] != [i for i, _ in e1]
    s.set_epoch(1)
    assert list(s) == e1
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]
    ranks = [list(EpochSampler(7, True, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert {i for r in ranks for i, _ in r} == set(range(7))


@pytest.fixture
def data_cfg() -> DataConfig:
    return DataConfig.model_validate({
        "train": {"type": "synthetic", "num_images": 6, "image_size": [64, 64], "object_size": [12, 24]},
        "val": {"type": "synthetic", "num_images": 4, "image_size": [64, 64], "object_size": [12, 24], "split": "val"},
        "transforms": {"min_size": 80, "max_size": 200, "hflip": 0.5, "photometric": True},
        "size_divisor": 16,
    })  # fmt: skip


def test_build_dataset_applies_split_transforms(data_cfg):
    train = build_dataset(data_cfg, "train")
    val = build_dataset(data_cfg, "val")
    assert train.transform.train and not val.transform.train
    assert train.classes == ["circle", "square", "triangle", "cross"]
    img, t = val[0]
    assert img.shape == (3, 80, 80) and t["scale"] == pytest.approx(1.25) and t["image_id"] == "val_000000"
    assert torch.equal(val[0][0], img)
    no_val = data_cfg.model_copy(update={"val": None})
    with pytest.raises(ConfigError, match="data.val"):
        build_dataset(no_val, "val")


def test_loader_is_independent_of_worker_count(data_cfg):
    ds = build_dataset(data_cfg, "train")
    runs = []
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=3, shuffle=True, num_workers=workers, seed=4)
        assert loader.persistent_workers == (workers > 0)
        epochs = [[(b.image_ids, b.images.clone(), b.boxes) for b in loader] for _ in range(2)]
        runs.append(epochs)
    for e in range(2):
        for (ids0, im0, bx0), (ids1, im1, bx1) in zip(runs[0][e], runs[1][e]):
            assert ids0 == ids1 and torch.equal(im0, im1)
            assert all(torch.equal(a, b) for a, b in zip(bx0, bx1))
    batch = runs[0][0][0]
    assert batch[1].shape == (3, 3, 80, 80)  # padded to a multiple of 16
    assert runs[0][0][0][0] != runs[0][1][0][0]  # reshuffled between epochs


def test_plain_dataset_loader(tiny_synth):
    loader = build_loader(tiny_synth, batch_size=4, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(batches) == 1 and batches[0].image_ids[0] == "train_000000"
    assert batches[0].scales.tolist() == [1.0] * 4 and batches[0].orig_sizes[0].tolist() == [64, 80]
