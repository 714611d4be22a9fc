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


# ------------------------------------------------------------ throughput (issue 8)
def test_group_in_batches_keeps_items_and_count_and_groups_full_batches():
    from detkit.data.loader import group_in_batches

    indices = list(range(11))
    groups = [0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    out = group_in_batches(indices, groups, 3)
    assert sorted(out) == indices
    full = [out[k : k + 3] for k in range(0, 9, 3)]
    assert all(len({groups[i] for i in b}) == 1 for b in full)
    assert full[0] == [1, 3, 4]  # group 1 fills first, in stream order
    assert out[9:] == [7, 8]  # the unfilled bucket ends the epoch


class _Shaped(torch.utils.data.Dataset):
    """Images of two aspect ratios (landscape 16x32, portrait 32x16), alternating."""

    def __init__(self, n: int):
        self.n = n
        self.classes = ["x"]

    def __len__(self) -> int:
        return self.n

    def size(self, i: int) -> tuple[int, int]:
        return (16, 32) if i % 2 == 0 else (32, 16)

    def annotation(self, i: int):
        return self.size(i), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}

    def __getitem__(self, i: int):
        h, w = self.size(i)
        return torch.rand(3, h, w), {**self.annotation(i)[1], "image_id": str(i)}


def _shaped_loader(group_by_aspect: bool, **kw):
    from detkit.data.config import TransformConfig
    from detkit.data.transforms import build_transform

    ds = TransformedDataset(_Shaped(12), build_transform(TransformConfig(min_size=16, max_size=32, hflip=0.0), True),
                            seed=1, size_divisor=32)
    return build_loader(ds, batch_size=2, shuffle=True, seed=3, group_by_aspect=group_by_aspect, **kw)


def test_grouped_batches_share_an_aspect_ratio_and_pad_less():
    grouped, plain = _shaped_loader(True), _shaped_loader(False)
    for epoch in range(2):
        grouped.sampler.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        g_batches, p_batches = list(grouped), list(plain)
        assert len(g_batches) == len(p_batches) == len(grouped) == 6
        assert sorted(i for b in g_batches for i in b.image_ids) == sorted(i for b in p_batches for i in b.image_ids)
        assert all(len({tuple(s) for s in b.image_sizes.tolist()}) == 1 for b in g_batches)
        assert all(tuple(b.images.shape[-2:]) in ((32, 32),) for b in g_batches)  # divisor 32 rounds 16 up
        mixed = [b for b in p_batches if len({tuple(s) for s in b.image_sizes.tolist()}) > 1]
        assert mixed, "the ungrouped control should mix shapes (seeded)"


def test_default_size_divisor_pads_to_32():
    assert DataConfig.model_validate({"train": {"type": "synthetic"}}).size_divisor == 32
    images, _ = pad_images([torch.rand(3, 33, 40)], size_divisor=32)
    assert images.shape == (1, 3, 64, 64)


def test_uint8_batches_become_float_on_the_device():
    samples = [(torch.rand(3, 6, 8), _target(1)), (torch.rand(3, 5, 8), _target(2))]
    as_float = Collate(size_divisor=8)(samples)
    as_uint8 = Collate(size_divisor=8, uint8=True)(samples)
    assert as_uint8.images.dtype == torch.uint8 and as_uint8.images.shape == as_float.images.shape
    moved = as_uint8.to("cpu")
    assert moved.images.dtype == torch.float32
    assert (moved.images - as_float.images).abs().max() <= 0.5 / 255 + 1e-6  # rounded, not truncated


def test_device_prefetcher_yields_every_batch_on_the_device(data_cfg):
    from detkit.data.loader import DevicePrefetcher

    loader = build_loader(build_dataset(data_cfg, "train"), batch_size=2, shuffle=False)
    expected = [b.image_ids for b in loader]
    got = list(DevicePrefetcher(loader, "cpu"))
    assert [b.image_ids for b in got] == expected
    assert all(b.images.dtype == torch.float32 for b in got)


def test_auto_workers_none_on_cpu_some_on_gpu_and_one_thread_each(monkeypatch):
    from detkit.data.loader import resolve_workers

    assert resolve_workers("auto", "cpu") == 0 and resolve_workers(3, "cpu") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_workers("auto", "cuda") == 12
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_workers("auto", "cuda") == 1
    assert DataConfig.model_validate({"train": {"type": "synthetic"}, "num_workers": "auto"}).num_workers == "auto"
    with pytest.raises(Exception, match="auto"):
        DataConfig.model_validate({"train": {"type": "synthetic"}, "num_workers": -1})


class _Threads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "scale": torch.get_num_threads()}
        return torch.zeros(3, 4, 4), target


def test_each_worker_runs_one_torch_thread():
    loader = build_loader(_Threads(), batch_size=2, shuffle=False, num_workers=1)
    assert next(iter(loader)).scales.tolist() == [1.0, 1.0]


def test_leftover_buckets_end_the_epoch_in_group_order():
    from detkit.data.loader import group_in_batches

    # Groups 2, 0, 1 each leave one sample over: they follow in group order 0, 1, 2.
    assert group_in_batches([10, 11, 12, 13, 14], [2, 0, 0, 1, 0], 2)[2:] == [14, 13, 10]
