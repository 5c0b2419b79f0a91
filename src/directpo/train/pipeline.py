"""`directpo pipeline`: the paper's recipe when no SFT model exists (§4, "πref = πSFT").

Stage 1, Preferred-FT: maximum likelihood on the chosen responses  -> OUTPUT/sft
Stage 2, DPO from the SFT model, with the SFT model as πref          -> OUTPUT/dpo

Each stage writes `run_complete.json` when it finishes; re-running the pipeline skips completed
stages, so a killed pipeline continues from the stage it was in.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..console import log
from .config import TrainConfig
from .loop import train
from .run import COMPLETE_MARKER, is_complete


def run_pipeline(cfg: TrainConfig, **sft_overrides) -> dict:
    root = Path(cfg.output_dir)
    sft_dir, dpo_dir = root / "sft", root / "dpo"
    sft_cfg = replace(cfg, loss="sft", output_dir=str(sft_dir), ref=None, overwrite=True,
                      **{k.removeprefix("sft_"): v for k, v in sft_overrides.items()})
    if sft_overrides.get("sft_epochs") is not None and "sft_max_steps" not in sft_overrides:
        sft_cfg = replace(sft_cfg, max_steps=None)
    if is_complete(sft_dir):
        log(f"pipeline: stage 1 (Preferred-FT) already complete in {sft_dir}")
    else:
        log(f"pipeline: stage 1 (Preferred-FT) -> {sft_dir}")
        train(sft_cfg)
    dpo_cfg = replace(cfg, model=str(sft_dir), ref=str(sft_dir), output_dir=str(dpo_dir), overwrite=True)
    if is_complete(dpo_dir):
        log(f"pipeline: stage 2 (DPO) already complete in {dpo_dir}")
    else:
        log(f"pipeline: stage 2 ({cfg.loss}, πref = the SFT model) -> {dpo_dir}")
        train(dpo_cfg)
    return {"sft": json.loads((sft_dir / COMPLETE_MARKER).read_text()),
            "dpo": json.loads((dpo_dir / COMPLETE_MARKER).read_text())}
