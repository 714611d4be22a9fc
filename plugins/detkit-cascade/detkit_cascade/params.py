"""The configuration of the cascade head: how many stages, and what changes from one to the next."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from detkit.registry import BoxHeadSpec, BoxLossSpec, ClassLossSpec, PoolerSpec, ProposalTargetSpec

# The paper's three stages (Cai & Vasconcelos, 2018), as MMDetection's and Detectron2's configs ship them.
DEFAULT_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
DEFAULT_STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
# Later stages see better boxes, so their deltas are smaller: each std halves, which keeps the
# normalised targets of every stage of about unit spread.
DEFAULT_LOC_NORMALIZE_STDS = (
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)
# The proposal target parameters each stage sets from iou_thresholds.
STAGE_THRESHOLD_FIELDS = ("pos_iou_thresh", "neg_iou_thresh_hi")
PER_STAGE = ("iou_thresholds", "stage_loss_weights", "loc_normalize_stds")
PER_STAGE_COMPONENTS = ("pooler", "box_head")

CLS_PRIOR_DESCRIPTION = (
    "initial foreground probability of each stage's classifier (background bias log(1-p), each "
    "class log(p/C)); null: zero bias"
)


class CascadeParams(BaseModel):
    """``model.roi_head`` of ``type: cascade``.

    Lists have one entry per stage.  ``pooler`` and ``box_head`` take one
    component (every stage builds its own copy, with its own weights) or a
    list of one per stage.  Lists left out take the paper's values of the
    first ``num_stages`` stages (up to three).
    """

    model_config = ConfigDict(extra="forbid")

    num_stages: int = Field(3, ge=1, le=8)
    iou_thresholds: list[float] = Field(
        default_factory=lambda: list(DEFAULT_IOU_THRESHOLDS),
        description="per stage: RoIs of at least this IoU with a gt box are its foreground, the rest background",
    )
    stage_loss_weights: list[float] = Field(
        default_factory=lambda: list(DEFAULT_STAGE_LOSS_WEIGHTS),
        description="per stage: factor of its two losses (s<k>_roi_loc, s<k>_roi_cls)",
    )
    loc_normalize_stds: list[tuple[float, float, float, float]] = Field(
        default_factory=lambda: [list(s) for s in DEFAULT_LOC_NORMALIZE_STDS],
        description="per stage: the box coder's std (deltas are divided by it)",
    )
    class_agnostic: bool = Field(
        True, description="one box per RoI for every class (the paper's); false: one per class"
    )
    pooler: list[PoolerSpec] = Field(
        default_factory=lambda: [{"type": "roi_align"}], validate_default=True,
        description="one pooler for every stage, or a list of one per stage",
    )
    box_head: list[BoxHeadSpec] = Field(
        default_factory=lambda: [{"type": "two_mlp"}], validate_default=True,
        description="one box head (each stage gets its own weights), or a list of one per stage",
    )
    proposal_target: ProposalTargetSpec = Field(
        default_factory=lambda: {"type": "proposal_target"}, validate_default=True,
        description="the sampler of every stage (n_sample, pos_ratio...); its IoU thresholds come from iou_thresholds",
    )
    loc_loss: BoxLossSpec = Field(default_factory=lambda: {"type": "smooth_l1"}, validate_default=True)
    cls_loss: ClassLossSpec = Field(default_factory=lambda: {"type": "cross_entropy"}, validate_default=True)
    cls_prior: float | None = Field(None, gt=0, lt=1, description=CLS_PRIOR_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _per_stage(cls, data: Any) -> Any:
        """One pooler/box head for all stages becomes a list; lists left out take the paper's first stages."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        n = data.get("num_stages", 3)
        if not isinstance(n, int) or n < 1:
            return data  # the field's own check reports it
        defaults = {
            "iou_thresholds": DEFAULT_IOU_THRESHOLDS,
            "stage_loss_weights": DEFAULT_STAGE_LOSS_WEIGHTS,
            "loc_normalize_stds": DEFAULT_LOC_NORMALIZE_STDS,
        }
        for name, values in defaults.items():
            if name not in data and n <= len(values):
                data[name] = [list(v) if isinstance(v, tuple) else v for v in values[:n]]
        for name in PER_STAGE_COMPONENTS:
            value = data.get(name, {"type": "roi_align"} if name == "pooler" else {"type": "two_mlp"})
            if not isinstance(value, list):
                data[name] = [value] * n
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "CascadeParams":
        n = self.num_stages
        for name in (*PER_STAGE, *PER_STAGE_COMPONENTS):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"{name} has {got} entries for num_stages {n}; give one per stage")
        for t in self.iou_thresholds:
            if not 0 < t <= 1:
                raise ValueError(f"iou_thresholds: {t} is not in (0, 1]")
        for w in self.stage_loss_weights:
            if not w >= 0:
                raise ValueError(f"stage_loss_weights: {w} is negative")
        for std in self.loc_normalize_stds:
            if not all(s > 0 for s in std):
                raise ValueError(f"loc_normalize_stds: {list(std)} has a value <= 0")
        sampler = self.proposal_target.params
        fields = type(sampler).model_fields
        missing = [f for f in STAGE_THRESHOLD_FIELDS if f not in fields]
        if missing:
            raise ValueError(
                f"proposal_target '{self.proposal_target.type}' has no {', '.join(missing)}, which each "
                "cascade stage sets from iou_thresholds"
            )
        # pos_iou_thresh / neg_iou_thresh_hi written under proposal_target are not refused: a saved
        # run's resolved config holds them (their defaults), and iou_thresholds overrides them per stage.
        return self

    def stage_sampler(self, k: int) -> dict[str, Any]:
        """The proposal target config of stage ``k``: the shared one with that stage's IoU threshold."""
        t = self.iou_thresholds[k]
        return {**self.proposal_target.to_dict(), **{f: t for f in STAGE_THRESHOLD_FIELDS}}
