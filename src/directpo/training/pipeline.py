"""`directpo pipeline`: the paper's recipe when no SFT model exists (§4, "πref = πSFT").

Stage 1, Preferred-FT: maximum likelihood on the chosen responses  -> OUTPUT/sft
Stage 2, DPO from the SFT model, with the SFT model as πref          -> OUTPUT/dpo

Each stage writes `run_complete.json` when it finishes; re-running the pipeline skips completed
stages, so a killed pipeline continues from the stage it was in. A finished stage is reused only
when its recorded settings (`directpo_config.json`) are the ones it would now run with: another
--model, --data, --lr, ... is refused (one line naming what differs), and `--overwrite` reruns
every stage. A stage that runs makes every later stage run too (they start from its output).
"""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from ..config import changed_settings, input_paths
from ..console import log
from ..errors import UserValueError
from ..losses import LOSS_SETTINGS, LOSSES
from ..outputs import RUN_MARKERS, check_output_dir
from .checkpoint import checkpoint_state, latest_checkpoint, list_checkpoints, remove_checkpoints
from .config import PipelineConfig, TrainConfig
from .loop import train
from .run import COMPLETE_MARKER, CONFIG_FILE, is_complete

PIPELINE_MARKERS = tuple(f"{stage}/{marker}" for stage in ("sft", "dpo") for marker in RUN_MARKERS)
# Settings a resumed run may change (`RESUMABLE_CHANGES`) but that change a finished run's result: a
# run of other length, another evaluation set (the result holds its final evaluation).
RESULT_SETTINGS = frozenset({"max_steps", "epochs", "eval_data"})
# The SFT stage's loss, and the loss settings it does not read (from the registry): the stage
# runs with those at their defaults, whatever the pipeline's DPO stage is given.
SFT_LOSS = LOSSES["sft"]
SFT_UNREAD = frozenset(LOSS_SETTINGS) - set(SFT_LOSS.params)
# Settings the SFT stage does not use, so a finished stage is reused whatever they are: the loss
# settings it does not read, the ones the stage resets (the DPO stage's loss weights, its
# conversion to unpaired rows, TR-DPO), and, as its loss has no reference, the reference's own.
SFT_UNUSED = SFT_UNREAD | {"loss_weights", "pairs_to_unpaired", "ref_sync_every"} | (
    set() if SFT_LOSS.needs_reference else {"precompute_ref", "ref_sync_mix"})


def run_pipeline(cfg: TrainConfig, **sft_overrides) -> dict:
    """Both stages (see the module's docstring). `cfg`: a `PipelineConfig` (its sft_* settings: the
    SFT stage's own) or a `TrainConfig` with them as `sft_overrides` (sft_lr=..., ...)."""
    if isinstance(cfg, PipelineConfig):
        cfg, own = cfg.stage_settings()
        sft_overrides = {**own, **sft_overrides}
    cfg.validate()  # the DPO stage's settings, refused now rather than after the SFT stage ran
    root = Path(cfg.output_dir)
    # The root is the pipeline's own (its stages' folders, each claimed by its run), never a folder
    # of someone else's files, nor an input's.
    check_output_dir(root, input_paths(cfg), cfg.overwrite, markers=PIPELINE_MARKERS, what="directpo pipeline")
    sft_dir, dpo_dir = root / "sft", root / "dpo"
    # Preferred-FT imitates the chosen responses (of pairs) or the desirable ones (of unpaired rows);
    # the DPO stage's loss settings that SFT does not read go back to their defaults (else its
    # config would be refused for them).
    defaults = {f.name: f.default for f in fields(cfg)}
    sft_cfg = replace(cfg, loss="sft", output_dir=str(sft_dir), ref=None, overwrite=True, loss_weights="",
                      ref_sync_every=0, pairs_to_unpaired=False, **{k: defaults[k] for k in SFT_UNREAD},
                      **{k.removeprefix("sft_"): v for k, v in sft_overrides.items()})
    if sft_overrides.get("sft_epochs") is not None and "sft_max_steps" not in sft_overrides:
        sft_cfg = replace(sft_cfg, max_steps=None)
    dpo_cfg = replace(cfg, model=str(sft_dir), ref=str(sft_dir), output_dir=str(dpo_dir), overwrite=True)
    stages = [("stage 1 (Preferred-FT)", sft_dir, sft_cfg, SFT_UNUSED),
              ("stage 2 (DPO)", dpo_dir, dpo_cfg, frozenset())]
    running = cfg.overwrite  # --overwrite: every stage runs again
    for i, (name, path, stage_cfg, unused) in enumerate(stages):
        if not running and is_complete(path):
            differences = stage_changes(path, stage_cfg, unused)
            if not differences:
                log(f"pipeline: {name} already complete in {path}")
                continue
            raise UserValueError(f"{name} in {path} finished with other settings ({'; '.join(differences)}); "
                                 "pass another --output-dir, or --overwrite to rerun the pipeline")
        stage_cfg = stage_start(name, path, stage_cfg, fresh=running)
        running = True
        for _, later, _, _ in stages[i:]:  # their results are stale from here on, even if this run is killed
            (later / COMPLETE_MARKER).unlink(missing_ok=True)
        log(f"pipeline: {name} -> {path}" if i == 0 else
            f"pipeline: stage 2 ({cfg.loss}, πref = the SFT model) -> {path}")
        train(stage_cfg)
    return {"sft": json.loads((sft_dir / COMPLETE_MARKER).read_text()),
            "dpo": json.loads((dpo_dir / COMPLETE_MARKER).read_text())}


def stage_start(name: str, path: Path, cfg: TrainConfig, fresh: bool) -> TrainConfig:
    """How a stage that runs starts: from its checkpoint when it was interrupted (Ctrl-C saves one and
    says 'resume'; starting over would lose its steps and leave its old checkpoints beside the new
    run's), else from step 0, its old checkpoints dropped. `fresh`: --overwrite, or an earlier stage
    ran now, so what this stage trained from has changed and its checkpoints are stale."""
    if fresh or not list_checkpoints(path):
        remove_checkpoints(path)
        return replace(cfg, resume=None)
    ckpt = latest_checkpoint(path, last_good=cfg.resume_from_last_good)
    # (precision: the checkpoint's resolved one, which the resumed run keeps; `auto` is not a change)
    diff = changed_settings(checkpoint_state(ckpt)["config"], cfg, cfg.RESUMABLE_CHANGES | {"precision"})
    if diff:
        raise UserValueError(f"{name} in {path} was interrupted at {ckpt.name}, with other settings "
                             f"({'; '.join(diff)}): rerun with those to continue it, or pass --overwrite to rerun "
                             "the pipeline")
    log(f"pipeline: {name} continues from its checkpoint {ckpt}")
    return replace(cfg, resume=str(ckpt))


def stage_changes(stage_dir: Path, cfg: TrainConfig, unused: frozenset = frozenset()) -> list[str]:
    """'name: recorded -> now' for every setting that changes the result of the finished run in
    `stage_dir` and differs from `cfg` (a missing record: everything differs)."""
    record = stage_dir / CONFIG_FILE
    if not record.exists():
        return [f"no {CONFIG_FILE} records them"]
    return changed_settings(json.loads(record.read_text()), cfg, (cfg.RESUMABLE_CHANGES - RESULT_SETTINGS) | unused)
