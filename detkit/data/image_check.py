"""Before training: are the first annotated images of each split where the config's ``root`` says?

A data set reader that knows its image files implements
``DetectionDataset.first_image_paths()``: the files of its first few annotated
images (COCO and VOC do; the default, empty, checks nothing).  When none of
them exists, ``root`` is wrong (a single missing file is a data problem,
listed by ``detkit data stats --check-images``); ``detkit config validate``,
``detkit data stats`` and the start of ``detkit train`` then fail in one line
naming the field to change and the path tried, instead of the first training
batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detkit.errors import DataError
from detkit.interfaces import DetectionDataset


def _reader(dataset: Any) -> DetectionDataset | None:
    """The data set reader itself, looking through wrappers (``TransformedDataset``)."""
    for _ in range(4):
        if dataset is None or isinstance(dataset, DetectionDataset):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def check_split_images(dataset: Any, split: str, source: str | None = None) -> None:
    """DataError (one line naming ``data.<split>.root`` and the path tried) when none of the first images exists.

    ``source``: the config file, to start the line with; ``dataset`` may be None (no such split).
    """
    reader = _reader(dataset)
    if reader is None:
        return
    paths = [Path(p) for p in reader.first_image_paths()]
    if not paths or any(p.is_file() for p in paths):
        return
    hint = reader.root_hint
    root = getattr(reader, "root", None)
    raise DataError(
        (f"{source}: " if source else "") + f"data.{split}.root: image not found: {paths[0]}"
        + (f" (nor the next {len(paths) - 1} annotated images)" if len(paths) > 1 else "")
        + f"; set data.{split}.root to {hint}" + (f" (it reads {root})" if root is not None else "")
    )


def check_data_images(data_cfg: Any, source: str) -> None:
    """:func:`check_split_images` for ``data.train`` and, when set, ``data.val`` (the readers alone, no transforms)."""
    from detkit.registry import registry

    for split in ("train", "val"):
        spec = getattr(data_cfg, split)
        if spec is not None:
            check_split_images(registry("dataset").build(spec), split, source)
