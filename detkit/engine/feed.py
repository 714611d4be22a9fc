"""What each training step trains on: :class:`EpochFeed`, the data side of the training loop.

:class:`detkit.engine.train.TrainLoop` inherits it: the train loader of each
epoch's batch size, the micro-batches an epoch and an optimizer step take, the
samples a mid-epoch resume has left (counted in samples, see
:mod:`detkit.engine.resume_plan`), and :class:`LossWindow`, the losses the
steps returned since the last log point.  The attributes these methods read
(``cfg``, ``dist``, ``device``, ``train_set``, ``_loaders``, ``_resumed``, ...)
are set by ``TrainLoop.__init__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from detkit.engine.resume_plan import ListSampler, refuse_if_steps_capped, saved_segments, segment


class LossWindow:
    """The detached losses of the steps since the last log point, averaged with one host sync."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self._mean: dict[str, float] | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.steps.append(losses)
        self._mean = None

    def reset(self) -> None:
        self.steps, self._mean = [], None

    def __len__(self) -> int:
        return len(self.steps)

    def mean(self) -> dict[str, float]:
        """Each loss's mean over the window (cached until the next ``add``)."""
        if self._mean is None:
            if not self.steps:
                return {}
            # A loss a trainer returns only on some steps is averaged over those steps.
            names = list(dict.fromkeys(n for step in self.steps for n in step))
            means = [torch.stack([s[n].float() for s in self.steps if n in s]).mean() for n in names]
            self._mean = dict(zip(names, torch.stack(means).tolist()))
        return self._mean


class EpochFeed:
    """The loaders, micro-batches and resumed-epoch samples of :class:`~detkit.engine.train.TrainLoop`."""

    # ----------------------------------------------------------------- data
    def loader_for(self, epoch: int) -> DataLoader:
        """The train loader of this epoch's batch size (one per size; workers persist)."""
        from detkit.data.loader import build_loader

        tc, data = self.cfg.train, self.cfg.data
        frozen = epoch < tc.freeze_backbone_epochs
        batch_size = (tc.freeze_batch_size or data.batch_size) if frozen else data.batch_size
        if batch_size not in self._loaders:
            world = self.dist.world_size
            self._loaders[batch_size] = build_loader(
                self.train_set, batch_size=batch_size, shuffle=True, num_workers=data.num_workers,
                # Every sample each epoch: the last batch may be short, and under torchrun the
                # sampler pads the ranks' shares by repeating samples (as DistributedSampler).
                seed=tc.seed, drop_last=False,
                num_replicas=world, rank=self.dist.rank, pin_memory=self.device.type == "cuda", device=self.device,
            )
        loader = self._loaders[batch_size]
        loader.sampler.set_epoch(epoch)  # shuffling and augmentation depend on (seed, epoch) only
        return loader

    def _micro_batches(self, epoch: int) -> int:
        """Loader batches this epoch trains on (``max_iters_per_epoch`` counts optimizer steps);
        for a resumed epoch, those before the resume counted as whole steps."""
        if self._resumed is not None and self._resumed[0] == epoch:
            return self.start_epoch_step * self.accumulate + self._resumed[2]
        n = len(self.loader_for(epoch))
        cap = self.cfg.train.max_iters_per_epoch
        return min(n, cap * self.accumulate) if cap else n

    def batches(self, epoch: int, skip_steps: int = 0) -> Iterator[Any]:
        """This epoch's batches; for the epoch a mid-epoch resume continues (``skip_steps``), only
        its untrained samples."""
        from detkit.data.loader import DevicePrefetcher

        loader = self.loader_for(epoch)
        if skip_steps and self._resumed is not None and self._resumed[0] == epoch:
            # The same epoch order minus what was trained on, counted in samples (resume_plan).
            loader = DataLoader(loader.dataset, batch_size=loader.batch_size,
                                sampler=ListSampler(self._resumed[1]), num_workers=loader.num_workers,
                                collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                                pin_memory=loader.pin_memory, generator=loader.generator)
        # The next batch is copied to the device (a side stream on CUDA) while this one trains.
        return DevicePrefetcher(loader, self.device)

    # ----------------------------------------------------------------- step
    def optimizer_step(self, batches: Iterator[Any], micro_batches: int) -> dict[str, torch.Tensor]:
        """Hand the trainer the next ``micro_batches`` loader batches for one optimizer step; its losses."""
        self.step_images = 0

        loop = self

        class Feed:
            """The step's micro-batches, fetched as the trainer takes them; sized, so it can scale by 1/k."""

            def __len__(self) -> int:
                return micro_batches

            def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
                for _ in range(micro_batches):
                    batch = next(batches)
                    loop.step_images += len(batch) * loop.dist.world_size
                    loop.augment_boxes[1] += getattr(batch, "augment_dropped", 0)
                    loop.augment_boxes[0] += sum(len(b) for b in batch.boxes)
                    yield batch.images, batch.targets

        return self.trainer.run_step(Feed())

    # --------------------------------------------------------------- resume
    def _segment(self, epoch: int) -> dict[str, Any]:
        """How this run batches ``epoch``: processes, batch size, aspect grouping."""
        loader = self.loader_for(epoch)
        return segment(self.dist.world_size, loader.batch_size, loader.sampler.grouped)

    def _plan_resumed_epoch(self, ckpt: dict[str, Any], path: Path) -> None:
        """A checkpoint saved inside an epoch: train that epoch's untrained samples, counted in
        samples, also with another batch size, accumulation or number of processes."""
        from detkit.data.loader import aspect_ratio_groups

        self._resumed = None
        if not self.start_epoch_step or self.start_epoch >= self.epochs:
            return
        epoch, loader = self.start_epoch, self.loader_for(self.start_epoch)
        sampler, current = loader.sampler, self._segment(self.start_epoch)
        segments = saved_segments(ckpt, path, epoch, self.dist.world_size, sampler.grouped)
        saved_acc = int(((ckpt.get("config") or {}).get("train") or {}).get("accumulate", 1) or 1)
        cap = self.cfg.train.max_iters_per_epoch
        refuse_if_steps_capped(path, segments, current, saved_acc, self.accumulate, cap)
        groups = sampler.group_ids
        if groups is None and any(s["grouped"] for s in segments):
            groups = aspect_ratio_groups(self.train_set)
        items = sampler.remaining(epoch, segments, groups)
        micro = -(-len(items) // loader.batch_size)
        if cap:  # the same settings as saved (refused otherwise): the cap's steps still left
            micro = min(micro, (cap - self.start_epoch_step) * self.accumulate)
        if micro <= 0:
            self.start_epoch, self.start_epoch_step = epoch + 1, 0
            return
        self._resumed = (epoch, items, micro, segments)
        self.epoch_steps[epoch] = self.start_epoch_step + -(-micro // self.accumulate)
        self.total_steps = sum(self.epoch_steps)
