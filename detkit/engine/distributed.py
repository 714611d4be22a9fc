"""Data-parallel training and evaluation across processes launched by ``torchrun``.

``torchrun --nproc-per-node 4 -m detkit.cli train CONFIG`` (or ``detkit-torchrun
--nproc-per-node 4 train CONFIG``, the same launcher with one-line failures)
starts one process per GPU, or per CPU worker with the gloo backend.  Each
process trains on its own shard of every epoch (the epoch sampler splits one
permutation by rank).

Training: the detector, whose train-mode forward returns its losses, is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap_for_training`)
and the wrapper becomes ``trainer.module`` (:class:`DistributedHook`).
The trainer's step runs its forward pass through the wrapper, so each micro-batch is
one DDP forward and one backward, and DDP all-reduces the gradients in buckets
while the backward pass is still running (skipped by ``no_sync`` on all but the
last micro-batch of an accumulated step).  ``train.sync_bn`` turns trainable
BatchNorm layers into :class:`~torch.nn.SyncBatchNorm` (:func:`convert_sync_batchnorm`).

Evaluation: each rank predicts on every ``world_size``-th image of the
validation set (no padding, so no image is counted twice), the per-image
results are gathered on rank 0 in data-set order, and rank 0 computes the
metrics once (:func:`evaluate_distributed`): the same numbers as one process.

Only rank 0 writes.  A user error on one rank ends the run with one line
(:func:`defer_error_to_rank0`, :func:`peer_failures_exit_quietly`, and the
:func:`launch_main` launcher behind ``detkit-torchrun``).
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from detkit.errors import ConfigError, DetkitError
from detkit.interfaces import Hook

if TYPE_CHECKING:
    from detkit.sections import EvalConfig
    from detkit.engine.evaluate import ImageResult


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when alone).

    NCCL on CUDA, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group while the interpreter is fully alive.

    A DistributedDataParallel wrapper keeps the gloo/NCCL process group alive
    (its reducer holds it), and training objects reference each other (hooks
    and their loop), so after the run they wait for the cyclic garbage
    collector.  Left to the interpreter's exit, the process group and its
    worker threads are torn down during finalisation, which can abort the
    process (``terminate called without an active exception``, SIGABRT).
    Collecting first frees the wrappers here, then the group goes.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def release_process_group() -> None:
    """:func:`shutdown` for whatever group this process joined (the CLI, after reporting an error)."""
    if dist.is_available() and dist.is_initialized():
        shutdown(DistInfo(dist.get_rank(), dist.get_world_size()))


# ------------------------------------------------------------------ training
def _trainable_batchnorms(model: nn.Module) -> list[tuple[nn.Module, str, nn.modules.batchnorm._BatchNorm]]:
    """``(parent, attribute, layer)`` of every plain BatchNorm that trains, i.e. is in training mode.

    Call it with the model in training mode: a frozen BatchNorm (``norm:
    frozen_bn``) stays in eval mode through ``model.train()`` and is left out.
    (Calling ``train()`` here would re-apply the backbones' freezing, which
    also switches ``requires_grad``.)
    """
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
        and child.training
    ]


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Replace each trainable BatchNorm of ``model`` by a SyncBatchNorm, in place; returns how many.

    The new layers take over the same parameter and buffer tensors (an
    optimizer built before keeps working) and the layer's mode.  Frozen
    BatchNorm layers stay plain BatchNorm: their statistics are fixed, there
    is nothing to synchronise: call it with the model in training mode, where
    frozen layers are the ones in eval mode.  SyncBatchNorm needs CUDA; on the CPU it would
    fail at the first step, so :func:`wrap_for_training` refuses it there.
    """
    count = 0
    for parent, name, bn in _trainable_batchnorms(model):
        sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            sync.weight, sync.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
            sync.num_batches_tracked = bn.num_batches_tracked
        sync.train(bn.training)
        setattr(parent, name, sync)
        count += 1
    return count


def wrap_for_training(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """The module the training step runs its forward pass through: the detector alone, or wrapped in DDP.

    DDP records the parameters that require gradients when it is built and
    expects a gradient for each of them in every step.  The frozen-backbone
    phase switches ``requires_grad`` of the trunk, so the wrapper is rebuilt
    whenever the trainable set changes (:class:`DistributedHook`) rather than
    built once with ``find_unused_parameters=True``: that would walk the
    autograd graph after every forward for the whole run, to serve a phase of
    a few epochs.  ``find_unused_parameters`` (``train.find_unused_parameters``)
    is only for models where some trainable parameter gets no gradient in
    some steps.  Buffers are broadcast from rank 0 at each forward only when a
    plain BatchNorm updates running statistics; frozen and synchronised
    BatchNorm statistics agree across ranks anyway.
    """
    if not info.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    sync = bool(_trainable_batchnorms(model))
    # Newer PyTorch renames broadcast_buffers (and warns about the old name).
    buffers = ({"forward_sync_buffers": sync} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": sync})
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        output_device=device.index if device.type == "cuda" else None,
        **buffers,
        find_unused_parameters=find_unused_parameters,
        # Gradients live in the all-reduce buckets: no copy in and out of them.
        gradient_as_bucket_view=True,
    )


class DistributedHook(Hook):
    """Keeps ``loop.trainer.module`` (what the step's forward runs through) a DistributedDataParallel
    wrapper of the detector.

    Builds it before training (after converting BatchNorm to SyncBatchNorm when
    ``train.sync_bn`` asks) and rebuilds it before any step where the set of
    parameters that require gradients changed (the frozen-backbone phase
    starting or ending, or a plugin hook freezing layers).  Runs after the
    hooks that switch ``requires_grad`` in ``before_epoch``.
    """

    priority = 6  # after FrozenBackboneHook (5)

    def __init__(self, sync_bn: bool = False, find_unused_parameters: bool = False):
        self.sync_bn = sync_bn
        self.find_unused_parameters = find_unused_parameters
        self._trainable: tuple[bool, ...] | None = None

    def before_train(self) -> None:
        loop = self.loop
        loop.model.train()  # which BatchNorm layers train shows in their mode
        if self.sync_bn and loop.dist.enabled:
            if loop.device.type != "cuda":
                raise ConfigError(
                    "train.sync_bn: SyncBatchNorm needs CUDA devices (NCCL); this run trains on "
                    f"{loop.device.type}: set train.sync_bn: false"
                )
            n = convert_sync_batchnorm(loop.model)
            loop.console.print(f"train.sync_bn: {n} BatchNorm layers synchronised across {loop.dist.world_size} "
                               "processes", markup=False, highlight=False, soft_wrap=True)
        self.before_step()  # the wrapper exists before other hooks start (and broadcasts rank 0's weights)

    def before_step(self) -> None:
        loop = self.loop
        trainable = tuple(p.requires_grad for p in loop.model.parameters())
        if trainable == self._trainable:
            return
        loop.trainer.module = loop.model  # drop the old wrapper (and its gradient hooks) first
        loop.trainer.module = wrap_for_training(loop.model, loop.dist, loop.device, self.find_unused_parameters)
        self._trainable = tuple(p.requires_grad for p in loop.model.parameters())

    def after_train(self) -> None:
        # The wrapper holds the process group: drop it before shutdown() destroys the group.
        self.loop.trainer.module = self.loop.model
        self._trainable = None


# ---------------------------------------------------------------- evaluation
def shard_loader(loader: Any, info: DistInfo, max_images: int | None = None) -> Any:
    """A loader over this rank's share of what ``loader`` yields: items ``rank, rank + world, ...``.

    The items are the ones the loader's own sampler yields (the first
    ``max_images`` of them), so prediction sees exactly the images a single
    process would.  No padding: ranks may get one image fewer than others.
    """
    from torch.utils.data import DataLoader

    items = list(iter(loader.sampler))
    if max_images:
        items = items[:max_images]
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=items[info.rank :: info.world_size],
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
    )


def gather_results(results: Sequence[Any], info: DistInfo) -> list[Any] | None:
    """Every rank's per-image results on rank 0, in the order of the unsharded loader; None elsewhere.

    Rank ``r``'s ``j``-th result is item ``r + j * world_size`` (see :func:`shard_loader`).
    """
    if not info.enabled:
        return list(results)
    parts: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(list(results), parts, dst=0)
    if parts is None:
        return None
    total = sum(len(p) for p in parts)
    return [parts[i % info.world_size][i // info.world_size] for i in range(total)]


def evaluate_distributed(
    model: nn.Module,
    loader: Any,
    classes: Sequence[str],
    cfg: "EvalConfig",
    device: torch.device,
    info: DistInfo,
    *,
    detections_path: str | os.PathLike | None = None,
    progress: Any = None,
    keep_results: bool = False,
) -> dict[str, Any] | None:
    """:func:`detkit.engine.evaluate.evaluate`, with prediction sharded over the ranks.

    Every rank must call it.  Returns the metrics on rank 0 and None on the
    others; the metrics equal a single process's over the same loader.
    ``detections_path`` (rank 0), ``progress`` (this rank's shard) and
    ``keep_results`` (rank 0: all images, in loader order) as for ``evaluate``.
    """
    from detkit.engine.evaluate import (
        compute_metrics,
        dataset_category_ids,
        evaluate,
        predict_dataset,
        write_detections,
    )

    if not info.enabled:
        return evaluate(model, loader, classes, cfg, device, detections_path=detections_path, progress=progress,
                        keep_results=keep_results)
    results = predict_dataset(model, shard_loader(loader, info, cfg.max_images), cfg, device, progress)
    gathered = gather_results(results, info)
    if gathered is None:
        return None
    category_ids = dataset_category_ids(getattr(loader, "dataset", None))
    out = compute_metrics(gathered, classes, cfg, category_ids)
    if detections_path is not None:
        write_detections(detections_path, gathered, category_ids)
    if keep_results:
        out["results"] = gathered
    return out


# ------------------------------------------------------------------ failures
# How long a rank other than 0 waits before reporting a user error.  An error
# that every rank hits (a bad path, a data error in a shared step) is then
# reported once, by rank 0: torchrun stops the other ranks as soon as rank 0
# exits, before their wait is over.
ERROR_GRACE_S = 3.0


@contextmanager
def agree_on_setup_errors(info: DistInfo) -> Iterator[None]:
    """Around the start of a run (data, model, checkpoint), under torchrun: one report for the run.

    An error there is often the same on every rank (a missing data
    directory), or on one rank only.  The ranks exchange whether their setup
    failed: the lowest failing rank (rank 0 when it failed) raises its error,
    the others exit quietly with its exit code.  No rank has to guess from a
    timeout whether another one will report.
    """
    if not info.enabled:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:
        failure = exc
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, None if failure is None else int(getattr(failure, "exit_code", 1)))
    failed = [rank for rank, code in enumerate(states) if code is not None]
    if not failed:
        return
    if info.rank == failed[0] and failure is not None:
        failure.agreed_reporter = True  # type: ignore[attr-defined]  # the CLI need not wait for rank 0
        raise failure
    time.sleep(ERROR_GRACE_S)  # the reporter prints first; its exit makes torchrun stop this process
    raise SystemExit(states[failed[0]])


def _launched_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def defer_error_to_rank0() -> None:
    """Before reporting a user error: on ranks other than 0 of a torchrun launch, wait a moment.

    Called by the CLI just before it prints an error line and exits.
    """
    rank, world = _launched_rank()
    if world > 1 and rank != 0 and not getattr(sys.exc_info()[1], "agreed_reporter", False):
        time.sleep(ERROR_GRACE_S)


def _is_peer_failure(exc: BaseException) -> bool:
    """An exception a collective raises because another process died (not this process's own error)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


@contextmanager
def peer_failures_exit_quietly(info: DistInfo) -> Iterator[None]:
    """When another rank fails, this rank's blocked collective raises: exit with 1, no traceback.

    The failing rank reports its own error; a traceback from every other rank
    would bury it.
    """
    try:
        yield
    except DetkitError:
        raise
    except Exception as exc:
        if info.enabled and _is_peer_failure(exc):
            raise SystemExit(1) from None
        raise


# ------------------------------------------------------------------ launcher
def launch_main(argv: Sequence[str] | None = None) -> None:
    """``detkit-torchrun [torchrun options] COMMAND ARGS``: torchrun running ``detkit COMMAND ARGS``.

    The options are torchrun's (``--nproc-per-node``, ``--nnodes``,
    ``--rdzv-backend``, ``--rdzv-endpoint``, ...).  It differs from
    ``torchrun -m detkit.cli`` in what a failure prints: the failing process's
    own one-line error and nothing else (no launcher traceback or failure
    table), and the exit code is that process's.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.module or args.no_python:
        sys.stderr.write("error: detkit-torchrun runs detkit itself; drop -m/--module and --no-python\n")
        raise SystemExit(2)
    args.training_script_args = [args.training_script, *args.training_script_args]
    args.training_script, args.module = "detkit.cli", True
    # torchrun warns about this default at every start; set it the same way, silently.
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
    # The agent logs each stopped worker and the failure; the worker's own line says what went wrong.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        raise SystemExit(_report_failures(exc.failures)) from None


def _report_failures(failures: dict[int, Any]) -> int:
    """The exit code of a failed launch; prints a line only for a process that could not print its own.

    A process that exited with a code reported its error itself (or, when a
    peer failed, exited quietly).  The agent stops the others with SIGTERM;
    any other signal (SIGKILL from the out-of-memory killer, SIGSEGV) killed a
    process before it could say anything.
    """
    exited = sorted((f.timestamp, -f.exitcode, rank) for rank, f in failures.items() if f.exitcode > 0)
    if exited:
        return -exited[0][1]
    killed = [(rank, f) for rank, f in sorted(failures.items()) if f.exitcode < 0]
    rank, failure = next(((r, f) for r, f in killed if f.signal_name() != "SIGTERM"), killed[0])
    sys.stderr.write(f"error: the process of rank {rank} was killed by {failure.signal_name()}\n")
    return 1
