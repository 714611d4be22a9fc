"""The ``data`` section of a config."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from detkit.registry import Component, ComponentSpec, DatasetSpec

TransformSpec = Annotated[ComponentSpec, Component("transform")]


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

    @model_validator(mode="after")
    def _ranges(self) -> "TransformConfig":
        if self.fixed_size is not None and min(self.fixed_size) <= 0:
            raise ValueError(f"fixed_size {self.fixed_size}: both sides must be > 0")
        if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(f"scale_jitter {self.scale_jitter}: need 0 < low <= high")
        return self


class DataConfig(BaseModel):
    """Which data sets to read and how to batch them."""

    model_config = ConfigDict(extra="forbid")

    train: DatasetSpec
    val: DatasetSpec | None = None
    batch_size: int = Field(1, gt=0)
    num_workers: int | Literal["auto"] = Field(
        0,
        description="data-loading processes (each runs one torch thread); auto: none when training on the "
        "CPU (the step needs the cores), min(CPUs - 2, 12) when a GPU trains",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or auto")
        return v
    size_divisor: int = Field(
        32, ge=0,
        description="pad batches up to a multiple of this (a multiple of the backbone stride): few batch "
        "shapes, so cudnn.benchmark tunes each once; 0 = pad to the largest image only",
    )
    group_by_aspect: bool = Field(
        True, description="batch training images of similar aspect ratio together (less padding)"
    )
    transforms: Annotated[
        Union[Annotated[TransformConfig, Tag("settings")], Annotated[list[TransformSpec], Tag("steps")]],
        Discriminator(lambda v: "steps" if isinstance(v, list) else "settings"),
    ] = Field(
        default_factory=TransformConfig,
        description="the settings mapping, or a list of transform plugins: [{type: resize, ...}, {type: hflip}]",
    )
