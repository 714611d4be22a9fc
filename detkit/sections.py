"""The ``train`` and ``eval`` sections of a config (core: the engine reads them, they import nothing of it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from detkit.registry import Component, ComponentSpec, EvaluatorSpec, TrainerSpec

HookSpec = Annotated[ComponentSpec, Component("hook")]
OptimizerSpec = Annotated[ComponentSpec, Component("optimizer")]
LRSchedulerSpec = Annotated[ComponentSpec, Component("lr_scheduler")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Before optimizers and schedules were plugins, one model held every type's
# fields and ignored those that did not apply.  Such a field is dropped with a
# warning, so existing configs keep working.
_LEGACY_FIELDS = {
    "optimizer": ({"sgd", "adam", "adamw"}, {"momentum", "betas"}),
    "scheduler": ({"step", "cosine", "constant"}, {"milestones", "gamma", "min_lr_ratio"}),
}


def _drop_legacy_fields(section: str, value: object) -> object:
    import warnings

    from detkit.registry import registry

    builtins, legacy = _LEGACY_FIELDS[section]
    if not isinstance(value, dict) or value.get("type", _DEFAULT_TYPES[section]) not in builtins:
        return value
    name = value.get("type", _DEFAULT_TYPES[section])
    kind = "optimizer" if section == "optimizer" else "lr_scheduler"
    try:
        accepted = set(registry(kind).get(name).params.model_fields)
    except Exception:  # an unknown or broken plugin: let validation report it
        return value
    unused = sorted(k for k in value if k in legacy and k not in accepted)
    if not unused:
        return value
    warnings.warn(
        f"train.{section}: {', '.join(unused)} does not apply to '{name}' and is ignored; "
        "remove it from the config", UserWarning, stacklevel=2,
    )
    return {k: v for k, v in value.items() if k not in unused}


_DEFAULT_TYPES = {"optimizer": "sgd", "scheduler": "step"}

class EMAConfig(_Strict):
    """``train.ema``: an exponential moving average of the weights (see detkit.engine.ema.EMAHook)."""

    decay: float = Field(0.9998, gt=0, lt=1, description="weight of the old average at each step")
    tau: float = Field(2000.0, ge=0, description="warm-up in steps: decay * (1 - exp(-step / tau)); 0: none")


class LossGuardConfig(_Strict):
    """``train.loss_guard``: stop a diverging run early (an inf/NaN loss always stops it)."""

    # On by default, from the first log point: a healthy Faster R-CNN total is about
    # 0.5-5 (under 10 at initialisation), and the ratio below needs `history` log
    # points, so a short run at a wild lr (1e6) would train to 1e17 and save best.pt.
    max_loss: float | None = Field(
        1000.0, gt=0, allow_inf_nan=False,
        description="stop when the logged total loss exceeds this (null: off; a trainer whose losses are "
        "on another scale sets its own)",
    )
    # On by default: a loss 1000x its recent median is divergence, not noise, and
    # training on would overwrite last.pt/best.pt with a ruined model.
    max_ratio: float | None = Field(
        1000.0, gt=1, description="stop when the logged total exceeds this many times the recent median (null: off)"
    )
    history: int = Field(20, ge=1, description="log points the median looks back over")


class TrainConfig(_Strict):
    trainer: TrainerSpec = Field(
        default_factory=lambda: {"type": "faster_rcnn_trainer"}, validate_default=True
    )
    epochs: int = Field(14, gt=0)
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: {"type": "sgd"}, validate_default=True,
        description="an optimizer plugin: sgd, adam, adamw, or a detkit.optimizer entry point",
    )
    scheduler: LRSchedulerSpec = Field(
        default_factory=lambda: {"type": "step"}, validate_default=True,
        description="an lr_scheduler plugin (stepped per optimizer step): step, cosine, constant, ...",
    )
    amp: bool = Field(False, description="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    cudnn_benchmark: bool | Literal["auto"] = Field(
        "auto", description="CUDA: let cuDNN time its convolution algorithms once per batch shape. auto: on while "
        "the run has seen at most 8 batch shapes (model.preprocess.size_divisible keeps them few), off from the 9th: multi-scale "
        "training makes dozens of shapes and each new one costs seconds of timing (benchmarks/README.md)"
    )
    compile: bool = Field(
        False, description="torch.compile the backbone and the RoI tail in place (CUDA; compiles once per batch "
        "shape, so it pays only on long runs: see benchmarks/README.md)"
    )
    accumulate: int = Field(
        1, ge=1, description="micro-batches per optimizer step (gradient accumulation): an effective "
        "batch of data.batch_size x accumulate; steps, log and checkpoint intervals count optimizer steps"
    )
    ema: EMAConfig | None = Field(None, description="average the weights for evaluation and the saved model")
    freeze_backbone_epochs: int = Field(0, ge=0)
    init_weights: str | None = Field(
        None, description="a detkit checkpoint whose model weights start this run (fine-tuning, e.g. one "
        "made by `detkit import-weights`); its classes must be the data's. Optimizer and schedule start fresh"
    )
    freeze_batch_size: int | None = Field(None, gt=0)
    max_iters_per_epoch: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/{name}"
    checkpoint_interval: int = Field(1, gt=0, description="write last.pt every N epochs")
    checkpoint_every_iters: int | None = Field(
        None, gt=0, description="also write last.pt every N steps (resumable mid-epoch)"
    )
    log_interval: int = Field(10, gt=0)
    tensorboard: bool = Field(
        False, description="TensorBoard event files in <run>/tensorboard: shorthand for hooks: [{type: tensorboard}] "
        "(pip install 'detkit[tensorboard]')"
    )
    sync_bn: bool = Field(
        False, description="under torchrun on GPUs: trainable BatchNorm layers use the statistics of all "
        "processes (SyncBatchNorm); frozen BatchNorm stays frozen"
    )
    find_unused_parameters: bool = Field(
        False, description="under torchrun: let DistributedDataParallel find trainable parameters without a "
        "gradient in a step (slower; only for models that skip layers; the frozen-backbone phase does not need it)"
    )
    loss_guard: LossGuardConfig = Field(default_factory=LossGuardConfig)
    hooks: list[HookSpec] = Field(
        default_factory=list, description="extra training hooks from plugins: [{type: name, ...params}]; "
        "the experiment trackers mlflow, wandb, tensorboard are built in"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_optimizer_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            data = dict(data)
            for section in _LEGACY_FIELDS:
                if section in data:
                    data[section] = _drop_legacy_fields(section, data[section])
        return data


class EvalConfig(_Strict):
    interval: int = Field(1, ge=0, description="evaluate every N epochs; 0 disables")
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_iou: float = Field(0.3, gt=0, le=1)
    iou_thresh: float = Field(0.5, gt=0, le=1)
    use_07_metric: bool = False
    max_images: int | None = Field(None, gt=0)
    metric: list[EvaluatorSpec] = Field(
        default_factory=lambda: ["voc"], validate_default=True,
        description="evaluators: voc, coco, or a list such as [coco, voc]; each may carry params ({type: voc, ...})",
    )
    best: str | None = Field(
        None, description="metric that picks best.pt, as <evaluator>/<metric> (coco/AP, voc/mAP); "
        "default: the first evaluator's headline",
    )

    @field_validator("metric", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _best_names_an_evaluator(self) -> "EvalConfig":
        types = [spec.type for spec in self.metric]
        if not types:
            raise ValueError("metric: name at least one evaluator (voc, coco)")
        dup = sorted({t for t in types if types.count(t) > 1})
        if dup:
            raise ValueError(f"metric: {', '.join(dup)} appears more than once")
        if self.best is not None:
            head, sep, name = self.best.partition("/")
            if not sep or not name or head not in types:
                raise ValueError(
                    f"best: {self.best!r} should be <evaluator>/<metric> with an evaluator of eval.metric "
                    f"({', '.join(types)}), e.g. {types[0]}/..."
                )
        return self
