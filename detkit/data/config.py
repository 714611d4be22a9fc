"""The ``data`` section of a config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from detkit.registry import DatasetSpec


class TransformConfig(BaseModel):
    """How images (and their boxes) are resized and augmented."""

    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(600, gt=0, description="short side after resizing")
    max_size: int = Field(1000, gt=0, description="cap on the long side after resizing")
    fixed_size: tuple[int, int] | None = Field(
        None, description="(height, width) to resize to, ignoring aspect; overrides min/max_size"
    )
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip (train)")
    photometric: bool = Field(False, description="random brightness/contrast/saturation (train)")
    scale_jitter: tuple[float, float] | None = Field(
        None, description="random factor range applied to min_size (train)"
    )


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: DatasetSpec
    val: DatasetSpec | None = None
    batch_size: int = Field(1, gt=0)
    num_workers: int = Field(0, ge=0)
    transforms: TransformConfig = TransformConfig()
