"""`directpo pipeline`: the paper's recipe when no SFT model exists (§4, "πref = πSFT").

Stage 1, Preferred-FT: maximum likelihood on the chosen responses  -> OUTPUT/sft
Stage 2, DPO from the SFT model, with the SFT model as πref          -> OUTPUT/dpo

Each stage writes `run_complete.json` when it finishes; re-running the pipeline skips completed
stages, so a killed pipeline continues from the stage it was in.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from .train.config import TrainConfig
from .train.loop import COMPLETE_MARKER, train


def _done(out: Path) -> bool:
    return (out / COMPLETE_MARKER).exists()


def run_pipeline(cfg: TrainConfig, **sft_overrides) -> dict:
    root = Path(cfg.output_dir)
    sft_dir, dpo_dir = root / "sft", root / "dpo"
    sft_cfg = replace(cfg, loss="sft", output_dir=str(sft_dir), ref=None, overwrite=True,
                      **{k.removeprefix("sft_"): v for k, v in sft_overrides.items()})
    if sft_overrides.get("sft_epochs") is not None and "sft_max_steps" not in sft_overrides:
        sft_cfg = replace(sft_cfg, max_steps=None)
    if _done(sft_dir):
        print(f"[directpo] pipeline: stage 1 (Preferred-FT) already complete in {sft_dir}", file=sys.stderr)
    else:
        print(f"[directpo] pipeline: stage 1 (Preferred-FT) -> {sft_dir}", file=sys.stderr)
        train(sft_cfg)
    dpo_cfg = replace(cfg, model=str(sft_dir), ref=str(sft_dir), output_dir=str(dpo_dir), overwrite=True)
    if _done(dpo_dir):
        print(f"[directpo] pipeline: stage 2 (DPO) already complete in {dpo_dir}", file=sys.stderr)
    else:
        print(f"[directpo] pipeline: stage 2 ({cfg.loss}, πref = the SFT model) -> {dpo_dir}", file=sys.stderr)
        train(dpo_cfg)
    return {"sft": json.loads((sft_dir / COMPLETE_MARKER).read_text()),
            "dpo": json.loads((dpo_dir / COMPLETE_MARKER).read_text())}
