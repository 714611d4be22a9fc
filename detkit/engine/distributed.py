"""Data-parallel training across processes launched by ``torchrun``.

``torchrun --nproc_per_node 4 -m detkit.cli train CONFIG`` starts one process
per GPU (or per CPU worker with the gloo backend).  Each process trains on its
own shard of every epoch (the epoch sampler splits one permutation by rank);
gradients are averaged across processes as they are accumulated in the
backward pass, so every process takes the same optimizer step; only rank 0
evaluates and writes the run directory.

Gradients are averaged by per-parameter hooks rather than by wrapping the
model in ``DistributedDataParallel``: a Faster R-CNN trainer calls its model
several times per step in different modes (extractor, rpn, head), which DDP's
one-forward-one-backward bookkeeping does not allow.  Each hook is a blocking
all-reduce, simple and correct but without DDP's bucketing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from detkit.errors import ConfigError


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
    """Join the process group torchrun describes in the environment (no-op when alone)."""
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


def average_gradients(model: nn.Module, world_size: int) -> list:
    """Average each parameter's gradient over the processes as soon as it is accumulated.

    Every process must run the same graph each step (same parameters used, same
    order), which holds when all ranks train the same model on equal batch counts.
    """
    handles, seen = [], set()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)

    for p in model.parameters():
        if id(p) in seen:  # a module shared by two parents (the RoI tail) appears twice
            continue
        seen.add(id(p))
        handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def broadcast_parameters(model: nn.Module) -> None:
    """Start every process from rank 0's weights and buffers."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
