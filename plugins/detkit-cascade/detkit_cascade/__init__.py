"""Cascade R-CNN for detkit, packaged the way any third party would: ``model.roi_head.type: cascade``."""

from detkit_cascade.head import CascadeRoIHead, CascadeStage
from detkit_cascade.params import CascadeParams

__all__ = ["CascadeRoIHead", "CascadeStage", "CascadeParams"]
