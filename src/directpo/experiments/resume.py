"""Resumable steps of the studies: a killed study continues where it stopped, and redoes nothing
that finished. The helpers live in `training.stages` (online DPO in `rlhf` uses them too, and may
not import the recipes); re-exported here for the studies."""
from __future__ import annotations

from ..training.stages import STAGE_RECORD, resumable, stage

__all__ = ["STAGE_RECORD", "resumable", "stage"]
