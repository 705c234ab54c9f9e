"""Losses: pure functions of features and an explicit process group, plus the Objective."""

from vlp.losses.contrastive import clip_loss
from vlp.losses.distill import distilled_clip_loss
from vlp.losses.objective import Objective
from vlp.losses.siglip import siglip_loss

__all__ = ["Objective", "clip_loss", "distilled_clip_loss", "siglip_loss"]
