"""The ``data`` section of a config."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from detkit.registry import Component, ComponentSpec, DatasetSpec

TransformSpec = Annotated[ComponentSpec, Component("transform")]

HFLIP_P = 0.5  # the hflip probability of both forms of data.transforms

# Sizes data.transforms once set: the input size is the detector's now, set in one place.
_MOVED = {
    "min_size": "the input size is set once, in model.preprocess.min_size (and model.preprocess.train_min_sizes "
                "for multi-scale training); move it there",
    "max_size": "the input size is set once, in model.preprocess.max_size; move it there",
    "scale_jitter": "multi-scale training is set once, in model.preprocess.train_min_sizes (a list of short "
                    "sides, e.g. [480, 544, 608]); replace the factor range by that list",
    "fixed_size": "the input size is set once, in model.preprocess.min_size and model.preprocess.max_size (a "
                  "fixed height x width is not supported); set those instead",
}
_RESIZE_STEP = ("the resize step is gone: the input size is set once, in model.preprocess.min_size (and "
                "model.preprocess.train_min_sizes for multi-scale training); move its sizes there and remove the step")


def _moved_size(value: object) -> tuple[tuple[str | int, ...], str] | None:
    """Where an old config sets the input size under data.transforms, and what to do instead."""
    if isinstance(value, dict):
        moved = [k for k in _MOVED if k in value]
        if len(moved) == 1:
            return (moved[0],), _MOVED[moved[0]]
        if moved:
            return (), (f"{', '.join(moved)}: the input size is set once, in model.preprocess (min_size, max_size, "
                        "train_min_sizes for multi-scale training); move them there")
    elif isinstance(value, list):
        for i, step in enumerate(value):
            if isinstance(step, dict) and step.get("type") == "resize":
                return (i,), _RESIZE_STEP
    return None


class TransformConfig(BaseModel):
    """The training augmentations, as settings (the same as ``[hflip, photometric]`` steps)."""

    model_config = ConfigDict(extra="forbid")

    hflip: float = Field(HFLIP_P, ge=0, le=1, description="probability of a horizontal flip (train)")
    photometric: bool = Field(False, description="random brightness/contrast/saturation (train)")


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
    group_by_aspect: bool = Field(
        True, description="batch training images of similar aspect ratio together (less padding)"
    )
    transforms: Annotated[
        Union[Annotated[TransformConfig, Tag("settings")], Annotated[list[TransformSpec], Tag("steps")]],
        Discriminator(lambda v: "steps" if isinstance(v, list) else "settings"),
    ] = Field(
        default_factory=TransformConfig,
        description="training augmentations: the settings mapping, or a list of transform plugins: "
        "[{type: hflip, p: 0.5}, {type: photometric}] (the input size is model.preprocess's)",
    )

    @model_validator(mode="before")
    @classmethod
    def _padding_moved_to_the_model(cls, value: object) -> object:
        if isinstance(value, dict) and "size_divisor" in value:
            msg = ("the padding multiple is set once, in model.preprocess.size_divisible (the detector pads "
                   "its batches); move it there")
            raise PydanticCustomError("detkit_component", "{summary}",
                                      {"summary": msg, "detkit_errors": [(("size_divisor",), msg)]})
        return value

    @field_validator("transforms", mode="before")
    @classmethod
    def _size_moved_to_the_model(cls, value: object) -> object:
        moved = _moved_size(value)
        if moved is not None:
            # A nested error (as components report theirs), so the path names the old key itself.
            loc, msg = moved
            raise PydanticCustomError("detkit_component", "{summary}", {"summary": msg, "detkit_errors": [(loc, msg)]})
        return value
