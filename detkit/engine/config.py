"""The ``train`` and ``eval`` sections of a config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from detkit.registry import TrainerSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Strict):
    type: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class SchedulerConfig(_Strict):
    type: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = Field(default_factory=list, description="epochs at which 'step' multiplies lr by gamma")
    gamma: float = Field(0.1, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")


class TrainConfig(_Strict):
    trainer: TrainerSpec = Field(
        default_factory=lambda: {"type": "faster_rcnn_trainer"}, validate_default=True
    )
    epochs: int = Field(14, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    amp: bool = Field(False, description="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    freeze_backbone_epochs: int = Field(0, ge=0)
    freeze_batch_size: int | None = Field(None, gt=0)
    max_iters_per_epoch: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/{name}"
    checkpoint_interval: int = Field(1, gt=0)
    log_interval: int = Field(10, gt=0)
    tensorboard: bool = False


class EvalConfig(_Strict):
    interval: int = Field(1, ge=0, description="evaluate every N epochs; 0 disables")
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_iou: float = Field(0.3, gt=0, le=1)
    iou_thresh: float = Field(0.5, gt=0, le=1)
    use_07_metric: bool = False
    max_images: int | None = Field(None, gt=0)
