from __future__ import annotations

import pytest
import torch

from detkit.interfaces import DetectionDataset
from detkit.data.collate import Collate
from detkit.data.config import DataConfig
from detkit.data.loader import EpochSampler, TransformedDataset, build_dataset, build_loader
from detkit.errors import ConfigError


def _target(g: int) -> dict:
    return {
        "boxes": torch.arange(4 * g, dtype=torch.float32).reshape(g, 4),
        "labels": torch.arange(g),
        "difficult": torch.zeros(g, dtype=torch.bool),
        "image_id": f"im{g}",
    }


def test_collate_keeps_each_image_at_its_own_size():
    # No resizing and no padding here: the detector's preprocessing does both, on its device.
    samples = [(torch.rand(3, 6, 8), _target(0)), (torch.rand(3, 10, 5), _target(2))]
    batch = Collate()(samples)
    assert len(batch) == 2 and [tuple(im.shape) for im in batch.images] == [(3, 6, 8), (3, 10, 5)]
    assert all(torch.equal(im, s[0]) for im, s in zip(batch.images, samples))
    assert [b.shape[0] for b in batch.boxes] == [0, 2]
    assert batch.labels[1].tolist() == [0, 1] and batch.labels[1].dtype == torch.int64
    assert batch.image_ids == ["im0", "im2"]
    assert batch.targets[1]["boxes"] is batch.boxes[1] and set(batch.targets[1]) == {"boxes", "labels", "difficult"}
    moved = batch.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved.images, batch.images)) and moved.image_ids == batch.image_ids
    with pytest.raises(ValueError, match="empty batch"):
        Collate()([])


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
        "val": {"type": "synthetic", "num_images": 4, "image_size": [64, 48], "object_size": [12, 24], "split": "val"},
        "transforms": {"hflip": 0.5, "photometric": True},
    })  # fmt: skip


def test_build_dataset_applies_split_transforms(data_cfg):
    train = build_dataset(data_cfg, "train")
    val = build_dataset(data_cfg, "val")
    assert train.transform.train and not val.transform.train
    assert train.classes == ["circle", "square", "triangle", "cross"]
    img, t = val[0]
    # Validation images as read (their own 64x48 size), what predict is given.
    assert img.shape == (3, 64, 48) and t["image_id"] == "val_000000"
    raw_img, raw_t = val.dataset[0]
    assert torch.equal(img, raw_img) and torch.equal(t["boxes"], raw_t["boxes"])
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
        epochs = [[(b.image_ids, [im.clone() for im in b.images], b.boxes) for b in loader] for _ in range(2)]
        runs.append(epochs)
    for e in range(2):
        for (ids0, im0, bx0), (ids1, im1, bx1) in zip(runs[0][e], runs[1][e]):
            assert ids0 == ids1 and all(torch.equal(a, b) for a, b in zip(im0, im1))
            assert all(torch.equal(a, b) for a, b in zip(bx0, bx1))
    images = runs[0][0][0][1]
    assert len(images) == 3 and all(im.shape == (3, 64, 64) and im.dtype == torch.uint8 for im in images)
    assert runs[0][0][0][0] != runs[0][1][0][0]  # reshuffled between epochs


def test_plain_dataset_loader(tiny_synth):
    loader = build_loader(tiny_synth, batch_size=4, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(batches) == 1 and batches[0].image_ids[0] == "train_000000"
    assert [tuple(im.shape) for im in batches[0].images] == [(3, 64, 80)] * 4


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


class _Shaped(DetectionDataset):
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

    ds = TransformedDataset(_Shaped(12), build_transform(TransformConfig(hflip=0.0), True), seed=1)
    return build_loader(ds, batch_size=2, shuffle=True, seed=3, group_by_aspect=group_by_aspect, **kw)


def _shapes(batch) -> set[tuple[int, ...]]:
    return {tuple(im.shape) for im in batch.images}


def test_grouped_batches_share_an_aspect_ratio_and_pad_less():
    # The detector pads a batch to its largest image: one shape per batch pads nothing.
    grouped, plain = _shaped_loader(True), _shaped_loader(False)
    for epoch in range(2):
        grouped.sampler.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        g_batches, p_batches = list(grouped), list(plain)
        assert len(g_batches) == len(p_batches) == len(grouped) == 6
        assert sorted(i for b in g_batches for i in b.image_ids) == sorted(i for b in p_batches for i in b.image_ids)
        assert all(len(_shapes(b)) == 1 for b in g_batches)
        mixed = [b for b in p_batches if len(_shapes(b)) > 1]
        assert mixed, "the ungrouped control should mix shapes (seeded)"


def test_uint8_batches_stay_uint8_in_transit_and_give_the_detector_the_float_input():
    from detkit.preprocess import ImagePreprocessor, PreprocessParams

    samples = [(torch.rand(3, 6, 8), _target(1)), (torch.rand(3, 5, 8), _target(2))]
    as_float = Collate()(samples)
    as_uint8 = Collate(uint8=True)(samples)
    assert all(im.dtype == torch.uint8 for im in as_uint8.to("cpu").images)  # a quarter of the bytes to the device
    assert all((a.float() / 255 - b).abs().max() <= 0.5 / 255 + 1e-6  # rounded, not truncated
               for a, b in zip(as_uint8.images, as_float.images))
    prep = ImagePreprocessor(PreprocessParams(min_size=12, max_size=16))
    x8, xf = prep(as_uint8.images)[0].tensor, prep(as_float.images)[0].tensor
    assert x8.shape == xf.shape == (2, 3, 12, 16)
    assert (x8 - xf).abs().max() <= (0.5 / 255) / min(prep.params.std) + 1e-5


def test_device_prefetcher_yields_every_batch_on_the_device(data_cfg):
    from detkit.data.loader import DevicePrefetcher

    loader = build_loader(build_dataset(data_cfg, "train"), batch_size=2, shuffle=False)
    expected = [b.image_ids for b in loader]
    got = list(DevicePrefetcher(loader, "cpu"))
    assert [b.image_ids for b in got] == expected
    assert all(im.dtype == torch.uint8 and im.device.type == "cpu" for b in got for im in b.images)


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
                  "image_id": torch.get_num_threads()}
        return torch.zeros(3, 4, 4), target


def test_each_worker_runs_one_torch_thread():
    loader = build_loader(_Threads(), batch_size=2, shuffle=False, num_workers=1)
    assert next(iter(loader)).image_ids == ["1", "1"]


def test_leftover_buckets_end_the_epoch_in_group_order():
    from detkit.data.loader import group_in_batches

    # Groups 2, 0, 1 each leave one sample over: they follow in group order 0, 1, 2.
    assert group_in_batches([10, 11, 12, 13, 14], [2, 0, 0, 1, 0], 2)[2:] == [14, 13, 10]
