"""Mid-epoch resume, counted in samples.

A checkpoint saved inside an epoch records how that epoch was trained so far
as *segments* (``epoch_progress``): ``{"world_size", "batch_size", "grouped",
"samples"}`` with ``samples`` taken by each rank.  A resumed run trains the
epoch's untrained samples (:meth:`detkit.data.loader.EpochSampler.remaining`)
whatever its own batch size, accumulation or number of processes, and then
adds its own segment.  The one thing samples cannot express is
``train.max_iters_per_epoch``, which counts optimizer steps: with it, a
mid-epoch resume that changes the batch size, the accumulation or the number of
processes is refused in one line.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from torch.utils.data import Sampler

from detkit.errors import CheckpointError, ConfigError


class ListSampler(Sampler):
    """A fixed list of ``(index, seed)`` pairs: the rest of a resumed epoch."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


def segment(world_size: int, batch_size: int, grouped: bool, samples: int = 0) -> dict[str, Any]:
    return {"world_size": int(world_size), "batch_size": int(batch_size), "grouped": bool(grouped),
            "samples": int(samples)}


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("world_size", "batch_size", "grouped"))


def add_samples(segments: list[dict[str, Any]], current: dict[str, Any], samples: int) -> list[dict[str, Any]]:
    """``segments`` followed by ``samples`` more of ``current``'s (merged when the settings agree:
    ``grouping`` a share minus its first full batches gives the rest of the same order)."""
    if segments and same_settings(segments[-1], current):
        return [*segments[:-1], {**segments[-1], "samples": segments[-1]["samples"] + samples}]
    return [*segments, {**current, "samples": samples}]


def saved_segments(ckpt: dict[str, Any], path: Any, epoch: int, world_now: int, grouped_now: bool) -> list[dict[str, Any]]:
    """The segments of the epoch a checkpoint stopped in.

    Checkpoints from before segments were stored give one, from the config
    they hold (``data.batch_size``, ``train.accumulate``, the frozen phase's
    ``train.freeze_batch_size``) and the ``epoch_step`` they stopped at,
    assuming this run's number of processes and grouping.
    """
    stored = ckpt.get("epoch_progress")
    if stored is not None:
        if not isinstance(stored, list) or not all(isinstance(s, dict) and set(s) >= {
                "world_size", "batch_size", "grouped", "samples"} for s in stored):
            raise CheckpointError(f"{path}: epoch_progress is malformed")
        return [segment(**{k: s[k] for k in ("world_size", "batch_size", "grouped", "samples")}) for s in stored]
    cfg = ckpt.get("config") or {}
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    batch = int(data.get("batch_size", 1))
    if epoch < int(train.get("freeze_backbone_epochs", 0) or 0) and train.get("freeze_batch_size"):
        batch = int(train["freeze_batch_size"])
    accumulate = int(train.get("accumulate", 1) or 1)
    steps = int(ckpt.get("epoch_step", 0))
    return [segment(world_now, batch, grouped_now and batch > 1, steps * accumulate * batch)]


def refuse_if_steps_capped(
    path: Any, segments: Sequence[dict[str, Any]], current: dict[str, Any], saved_accumulate: int,
    accumulate: int, capped: int | None,
) -> None:
    """``train.max_iters_per_epoch`` counts optimizer steps: samples cannot carry it across other settings."""
    if not capped or not segments:
        return
    last = segments[-1]
    changes = []
    if last["batch_size"] != current["batch_size"]:
        changes.append(f"data.batch_size {last['batch_size']} -> {current['batch_size']}")
    if saved_accumulate != accumulate:
        changes.append(f"train.accumulate {saved_accumulate} -> {accumulate}")
    if last["world_size"] != current["world_size"]:
        changes.append(f"processes {last['world_size']} -> {current['world_size']}")
    if changes or len(segments) > 1:
        what = ", ".join(changes) or "settings changed by an earlier resume"
        raise ConfigError(
            f"{path}: saved inside an epoch capped by train.max_iters_per_epoch {capped} (optimizer steps), "
            f"and {what}: the rest of that epoch cannot be counted exactly; resume with the saved settings, "
            "or from a checkpoint at an epoch's end"
        )
