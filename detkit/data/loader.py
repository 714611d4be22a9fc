"""Data sets with transforms, and data loaders with reproducible randomness.

Augmentation randomness is handed out by the sampler, in the main process:
each epoch :class:`EpochSampler` draws a permutation and one seed per sample
from a generator seeded by ``(seed, epoch)``, and yields ``(index, seed)``
pairs.  :class:`TransformedDataset` seeds the sample's transform with it.  So
an epoch's batches and augmentations depend on the seed and the epoch only,
not on the number of workers or on which worker loads a sample.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detkit.data.collate import Collate
from detkit.data.config import DataConfig
from detkit.data.synthetic import sample_seed
from detkit.data.transforms import DetectionTransform, build_transform
from detkit.errors import ConfigError


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied; indexable by ``i`` or ``(i, seed)``.

    An int index uses a seed derived from ``(seed, i)``, so even direct
    indexing is reproducible.  ``classes`` and ``size_divisor`` are exposed
    for the loader and the model builder.
    """

    def __init__(self, dataset: Any, transform: DetectionTransform, seed: int = 0, size_divisor: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.size_divisor = size_divisor

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, sample_seed(self.seed, "augment", int(key))
        image, target = self.dataset[int(index)]
        g = None
        if self.transform.train:
            g = torch.Generator()
            g.manual_seed(int(seed))
        return self.transform(image, target, g)

    def annotation(self, index: int) -> tuple[tuple[int, int], dict[str, Any]]:
        """Eval-mode ``(size, target)`` without decoding pixels, where the data set allows it."""
        if hasattr(self.dataset, "annotation"):
            size, target = self.dataset.annotation(index)
        else:
            image, target = self.dataset[index]
            size = (int(image.shape[-2]), int(image.shape[-1]))
        return self.transform.boxes_only(size, target)


class EpochSampler(Sampler):
    """Yields ``(index, augmentation seed)`` pairs, reshuffled every epoch.

    Each ``iter()`` uses the current epoch and then advances it; call
    :meth:`set_epoch` when resuming.  With ``num_replicas > 1`` each rank gets
    every ``num_replicas``-th sample of the same permutation, padded by
    wrapping around so all ranks take the same number of steps.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(sample_seed(self.seed, "epoch", self.epoch))
        self.epoch += 1
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        total = len(self) * self.num_replicas
        if total > self.size and self.size > 0:
            order = torch.cat((order, order[: total - self.size]))
        mine = order[self.rank :: self.num_replicas]
        return iter(zip(mine.tolist(), seeds[mine].tolist()))


def build_dataset(
    data_cfg: DataConfig,
    split: Literal["train", "val"],
    augment: bool | None = None,
    seed: int = 0,
) -> TransformedDataset:
    """The ``split`` data set of ``data_cfg`` with its transforms.

    The data set type comes from the registry, so it can be a plugin.  The
    train split augments (unless ``augment=False``); val only resizes.
    """
    from detkit.registry import registry

    if split == "train":
        spec = data_cfg.train
    elif split == "val":
        spec = data_cfg.val
        if spec is None:
            raise ConfigError("data.val: not set; add a validation data set to the config's data section")
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    dataset = registry("dataset").build(spec)
    train = (split == "train") if augment is None else augment
    transform = build_transform(data_cfg.transforms, train=train)
    return TransformedDataset(dataset, transform, seed=seed, size_divisor=data_cfg.size_divisor)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    *,
    size_divisor: int | None = None,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader of :class:`~detkit.data.collate.Batch` es over ``dataset``.

    ``size_divisor`` defaults to the data set's own (set by :func:`build_dataset`).
    Workers persist across epochs; the sampler is ``loader.sampler``
    (an :class:`EpochSampler`, with ``set_epoch``).
    """
    if size_divisor is None:
        size_divisor = int(getattr(dataset, "size_divisor", 0))
    if isinstance(dataset, TransformedDataset):
        sampler: Sampler = EpochSampler(len(dataset), shuffle, seed, num_replicas, rank)
    else:
        # A plain data set takes int indices: shuffle with a seeded generator.
        g = torch.Generator()
        g.manual_seed(seed)
        sampler = (
            torch.utils.data.RandomSampler(dataset, generator=g)
            if shuffle
            else torch.utils.data.SequentialSampler(dataset)
        )
    loader_gen = torch.Generator()
    loader_gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collate(size_divisor),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=loader_gen,
    )
