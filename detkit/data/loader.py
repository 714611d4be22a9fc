"""Data sets with transforms, and data loaders with reproducible randomness.

Augmentation randomness is handed out by the sampler, in the main process:
each epoch :class:`EpochSampler` draws a permutation and one seed per sample
from a generator seeded by ``(seed, epoch)``, and yields ``(index, seed)``
pairs.  :class:`TransformedDataset` seeds the sample's transform with it.  So
an epoch's batches and augmentations depend on the seed and the epoch only,
not on the number of workers or on which worker loads a sample.

Throughput:

* **Aspect-ratio groups.**  With ``group_ids`` the sampler reorders each
  epoch's permutation so that every run of ``batch_size`` consecutive samples
  comes from one group (images of similar aspect ratio, as in torchvision's
  detection references), so padded batches waste few pixels.  The leftovers
  of all groups end the epoch, mixed.  The number of batches is unchanged.
* **uint8 batches.**  Workers (each runs one torch thread, as ``DataLoader``
  sets it) send images as uint8 at their own sizes; the detector's
  preprocessing makes them float32, resizes and pads them on its device.
* **Prefetch to the device.**  :class:`DevicePrefetcher` copies the next
  batch from pinned memory on a side CUDA stream while the current one trains.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detkit.data.collate import Collate
from detkit.data.config import DataConfig
from detkit.data.synthetic import sample_seed
from detkit.data.transforms import DetectionTransform, build_transform
from detkit.errors import ConfigError
from detkit.interfaces import DetectionDataset


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied; indexable by ``i`` or ``(i, seed)``.

    An int index uses a seed derived from ``(seed, i)``, so even direct
    indexing is reproducible.  ``classes`` is exposed for the loader and the
    model builder.
    """

    def __init__(self, dataset: Any, transform: DetectionTransform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.group_by_aspect = True  # batch similar aspect ratios together (build_loader's default)

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
        found = _annotation(self.dataset, index)
        if found is None:
            image, target = self.dataset[index]
            return (int(image.shape[-2]), int(image.shape[-1])), dict(target)
        return found


class EpochSampler(Sampler):
    """Yields ``(index, augmentation seed)`` pairs, reshuffled every epoch.

    Each ``iter()`` uses the current epoch and then advances it; call
    :meth:`set_epoch` when resuming.  With ``num_replicas > 1`` each rank gets
    every ``num_replicas``-th sample of the same permutation, padded by
    wrapping around so all ranks take the same number of steps.

    ``group_ids`` (one int per sample) with ``batch_size > 1``: each rank's
    samples are reordered so that every ``batch_size`` consecutive ones share
    a group (see :func:`group_in_batches`).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        group_ids: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"{len(group_ids)} group ids for {size} samples")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    @property
    def grouped(self) -> bool:
        return self.group_ids is not None and self.batch_size > 1

    def _draw(self, epoch: int) -> tuple[list[int], list[int]]:
        """The epoch's permutation and one augmentation seed per sample: a function of (seed, epoch)."""
        g = torch.Generator()
        g.manual_seed(sample_seed(self.seed, "epoch", epoch))
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        return order.tolist(), seeds.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._draw(self.epoch)
        self.epoch += 1
        padded = _wrap_pad(order, self.num_replicas)
        mine = [padded[p] for p in _rank_positions(padded, self.rank, self.num_replicas,
                                                   self.group_ids if self.grouped else None, self.batch_size)]
        return iter([(i, seeds[i]) for i in mine])

    def remaining(
        self, epoch: int, segments: Sequence[dict[str, Any]], group_ids: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """This rank's ``(index, seed)`` pairs of ``epoch`` not yet trained by a run saved mid-epoch.

        ``segments``: how the saved run trained this epoch so far, in order, each
        ``{"world_size", "batch_size", "grouped", "samples"}`` (``samples``: taken
        by each rank; a resume with other settings starts a new segment).
        ``group_ids``: the aspect-ratio groups, for segments that grouped.  With the
        same number of ranks, each rank continues its own share after the trained
        samples, batched (and grouped) with this sampler's batch size: with
        unchanged settings exactly the uninterrupted run's order.  With another
        number of ranks the untrained samples are shared out anew, padded as at
        an epoch's start.  Either way each sample of the epoch is trained once
        (padding aside), counted in samples, whatever batch sizes were used.
        """
        order, seeds = self._draw(epoch)
        shares: list[list[int]] | None = None
        trained: set[int] = set()
        for seg in [*segments, {"world_size": self.num_replicas, "batch_size": self.batch_size,
                                "grouped": self.grouped, "samples": 0}]:
            world = int(seg["world_size"])
            if shares is None or len(shares) != world:
                pool = [i for i in order if i not in trained]
                padded = _wrap_pad(pool, world)
                shares = [padded[r::world] for r in range(world)]
            groups = (group_ids or self.group_ids) if seg["grouped"] else None
            batch = int(seg["batch_size"])
            for r, share in enumerate(shares):
                positions = list(range(len(share)))
                if groups is not None and batch > 1:
                    positions = group_in_batches(positions, [groups[share[p]] for p in positions], batch)
                taken = set(positions[: int(seg["samples"])])
                trained.update(share[p] for p in taken)
                if seg["samples"]:
                    shares[r] = [share[p] for p in range(len(share)) if p not in taken]
                elif r == self.rank:
                    return [(share[p], seeds[share[p]]) for p in positions]
        raise AssertionError("unreachable")


def _wrap_pad(order: list[int], replicas: int) -> list[int]:
    """``order`` padded by wrapping around to a multiple of ``replicas``, so all ranks take equal shares."""
    if not order:
        return order
    total = -(-len(order) // replicas) * replicas
    return (order * -(-total // len(order)))[:total]


def _rank_positions(
    padded: list[int], rank: int, replicas: int, group_ids: Sequence[int] | None, batch_size: int
) -> list[int]:
    """Positions in ``padded`` of rank ``rank``'s samples, in the order it trains them."""
    positions = list(range(rank, len(padded), replicas))
    if group_ids is not None and batch_size > 1:
        positions = group_in_batches(positions, [group_ids[padded[p]] for p in positions], batch_size)
    return positions


def group_in_batches(indices: Sequence[int], groups: Sequence[int], batch_size: int) -> list[int]:
    """``indices`` reordered so that each full run of ``batch_size`` shares one group.

    Streams through ``indices`` in order, filling one bucket per group and
    emitting a bucket when it holds ``batch_size``; the partly filled buckets
    follow at the end in group order, so that a mixed batch joins neighbouring
    groups (similar aspect ratios: less padding, fewer new batch shapes for
    ``cudnn.benchmark`` to tune).  The same items, the same count:
    ``ceil(len / batch_size)`` batches, as without grouping.
    """
    buckets: dict[int, list[int]] = {}
    out: list[int] = []
    for index, group in zip(indices, groups):
        bucket = buckets.setdefault(group, [])
        bucket.append(index)
        if len(bucket) == batch_size:
            out += bucket
            del buckets[group]
    for group in sorted(buckets):
        out += buckets[group]
    return out


# Aspect-ratio bins (height / width), log-spaced around 1 like torchvision's references.
_ASPECT_BINS = [2 ** (k / 3) for k in range(-3, 4)]  # 0.5 .. 2.0


def aspect_ratio_groups(dataset: Any) -> list[int] | None:
    """A group id per sample from its image's height / width, or None where sizes are unknown.

    Reads sizes from the data set's annotations (``annotation(i)``: VOC/COCO
    headers, never pixels).  Bins are log-spaced from 1/2 to 2; a set whose
    images all share one bin gives one group.
    """
    base = dataset.dataset if isinstance(dataset, TransformedDataset) else dataset
    groups = []
    for i in range(len(base)):
        found = _annotation(base, i)
        if found is None:
            return None
        (h, w), _ = found
        ratio = h / w if w else 1.0
        groups.append(sum(ratio >= b for b in _ASPECT_BINS))
    return groups


def _annotation(dataset: Any, index: int) -> tuple[tuple[int, int], dict[str, Any]] | None:
    """The data set's header-only annotation (:meth:`DetectionDataset.annotation`), or None."""
    return dataset.annotation(index) if isinstance(dataset, DetectionDataset) else None


def build_dataset(
    data_cfg: DataConfig,
    split: Literal["train", "val"],
    augment: bool | None = None,
    seed: int = 0,
) -> TransformedDataset:
    """The ``split`` data set of ``data_cfg`` with its transforms.

    The data set type comes from the registry, so it can be a plugin.  The
    train split augments (unless ``augment=False``); val is as read.
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
    out = TransformedDataset(dataset, transform, seed=seed)
    out.group_by_aspect = data_cfg.group_by_aspect
    return out


def resolve_workers(num_workers: int | str, device: torch.device | str | None = None) -> int:
    """``num_workers`` as a number; ``"auto"``: 0 for CPU training, min(CPUs - 2, 12) for a GPU."""
    if num_workers != "auto":
        return int(num_workers)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cpu":
        return 0  # the training step uses every core; workers would only take them away
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 2, 12))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int | str = 0,
    seed: int = 0,
    drop_last: bool = False,
    *,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    group_by_aspect: bool | None = None,
    uint8: bool = True,
    device: torch.device | str | None = None,
) -> DataLoader:
    """A DataLoader of :class:`~detkit.data.collate.Batch` es over ``dataset``.

    Workers persist across epochs; the sampler is ``loader.sampler``
    (an :class:`EpochSampler`, with ``set_epoch``).  ``group_by_aspect``
    (default: the data set's, set from ``data.group_by_aspect``; shuffled loaders of a :class:`TransformedDataset`, batches of 2 or more)
    batches images of similar aspect ratio together.  ``uint8`` ships images
    as uint8 until :meth:`Batch.to`; ``pin_memory`` is for CUDA training.
    ``num_workers="auto"`` resolves with ``device`` (see :func:`resolve_workers`).
    """
    num_workers = resolve_workers(num_workers, device)
    if group_by_aspect is None:
        group_by_aspect = bool(getattr(dataset, "group_by_aspect", True))
    if isinstance(dataset, TransformedDataset):
        groups = aspect_ratio_groups(dataset) if group_by_aspect and shuffle and batch_size > 1 else None
        if groups is not None and len(set(groups)) < 2:
            groups = None  # one shape class: grouping would change nothing
        sampler: Sampler = EpochSampler(len(dataset), shuffle, seed, num_replicas, rank, groups, batch_size)
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
        collate_fn=Collate(uint8=uint8),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=loader_gen,
    )


class DevicePrefetcher:
    """Iterates ``batches`` already on ``device``, the next one copied while the current one trains.

    On CUDA the copy runs on a side stream from pinned memory
    (``non_blocking``), and each batch is handed over with a stream wait (no
    host synchronisation) and ``record_stream`` so the allocator keeps its
    memory until the compute stream is done with it.  On other devices it is
    a plain ``batch.to(device)``.  Works for anything with ``.to(device,
    non_blocking=...)``.
    """

    def __init__(self, batches: Iterable[Any], device: torch.device | str):
        self.device = torch.device(device)
        self.iterator = iter(batches)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._next: Any = None
        self._done = False
        self._preload()

    def _preload(self) -> None:
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._next, self._done = None, True
            return
        if self.stream is None:
            self._next = batch.to(self.device)
            return
        with torch.cuda.stream(self.stream):
            self._next = batch.to(self.device, non_blocking=True)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        batch = self._next
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in _tensors(batch):
                t.record_stream(current)
        self._preload()
        return batch


def _tensors(batch: Any) -> Iterator[Tensor]:
    values = vars(batch).values() if hasattr(batch, "__dict__") else batch
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, Tensor))
