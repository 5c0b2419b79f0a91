"""Checkpoints that survive `kill -9` and resume bit-identically.

A checkpoint is a directory `OUTPUT/checkpoints/step-NNNNNNNN/` holding

    model.safetensors   the trainable weights (safetensors only: loading runs no code)
    optimizer.pt        optimizer and lr-scheduler state (read back with torch.load(weights_only=True))
    state.json          step, epoch and the config it was made with
    rng.pt              torch CPU (and CUDA) RNG states
    extra.pt            what else a trainer needs to continue exactly (PPO: value head, KL
                        coefficient, mini-batch generator), when it has any

or, with `--checkpoint-format sharded`, `shards/` (torch.distributed.checkpoint: every rank's
shards of the trainable weights and optimizer state, written by the ranks themselves, nothing
gathered; it loads on any number of processes) and `scheduler.pt` in place of the first two.

It is written into a temporary sibling directory and renamed into place only when complete: a
rename is atomic, so a checkpoint directory either exists whole or not at all, and a crash during a
write leaves the previous checkpoints untouched. The data position needs no saving: the batch of
step k is a function of (seed, k) (`batch_order`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distributed import load_shards, save_shards

PREFIX = "step-"
SHARDS = "shards"  # a sharded checkpoint's DCP directory


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (all of them, or the LoRA adapters), contiguous and on the CPU."""
    names = trainable_names(model)
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


# How an optimizer computes its step (torch's fused kernel, its foreach loop) belongs to the process
# that runs it, not to the state: a one-process run uses fused AdamW, an FSDP run (DTensor
# parameters) does not, and each must resume the other's checkpoint with its own kernel. The
# kernel is the same update, so checkpoints leave it out and loading keeps the optimizer's own.
KERNEL_CHOICE = ("fused", "foreach")


def _without_kernel_choice(optim_state: dict) -> dict:
    groups = [{k: v for k, v in g.items() if k not in KERNEL_CHOICE} for g in optim_state.get("param_groups", [])]
    return {**optim_state, "param_groups": groups}


def save_checkpoint(output_dir: str | Path, step: int, epoch: int, model, optimizer, scheduler, config: dict,
                    keep_last: int = 0, state: tuple[dict, dict] | None = None, extra: dict | None = None) -> Path:
    """`state`: (weights, optimizer state) already gathered from a sharded model (`Dist.gather_state`);
    else they are taken from `model` and `optimizer`. `extra`: tensors and numbers the trainer needs
    back on resume (read with weights_only=True: no pickled code)."""
    weights, optim_state = state or (trainable_state(model), optimizer.state_dict())
    root = checkpoint_root(output_dir)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    _fresh_dir(tmp)
    try:
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save({"optimizer": _without_kernel_choice(optim_state), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        _finish(tmp, final, step, epoch, config, extra)
    except BaseException as e:
        _failed(e, tmp, final)
        raise
    _prune(output_dir, keep_last)
    return final


def save_sharded_checkpoint(output_dir: str | Path, step: int, epoch: int, model, optimizer, scheduler,
                            config: dict, d, keep_last: int = 0, extra: dict | None = None) -> Path:
    """The sharded format: every process calls (`d`: its `Dist`). All ranks write their shards into
    one temporary directory (the same name on every rank), then rank 0 adds the small files and
    renames it into place, as `save_checkpoint` does: a crash on any rank at any point leaves no
    checkpoint directory for this step, and the earlier ones whole."""
    root = checkpoint_root(output_dir)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}-sharded"
    if d.main:
        _fresh_dir(tmp)
    d.barrier()  # the directory exists (and holds nothing stale) before any rank writes into it
    try:
        save_shards(model, optimizer, tmp / SHARDS)  # returns on rank 0 when every rank's files are written
        if d.main:
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
            _finish(tmp, final, step, epoch, config, extra)
    except BaseException as e:
        if d.main:
            _failed(e, tmp, final)
        raise
    if d.main:
        _prune(output_dir, keep_last)
    return final


def _fresh_dir(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a process killed mid-write
        shutil.rmtree(tmp)
    tmp.mkdir()


def _finish(tmp: Path, final: Path, step: int, epoch: int, config: dict, extra: dict | None) -> None:
    """RNG, extra state and state.json into `tmp`, everything fsynced, then `tmp` renamed to `final`."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    if extra is not None:
        torch.save(extra, tmp / "extra.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch, "config": config}, indent=1))
    for f in tmp.iterdir():  # (DCP fsyncs the shards it writes; its directory entry is synced here)
        if f.is_dir():
            _fsync_dir(f)
        else:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _failed(e: BaseException, tmp: Path, final: Path) -> None:
    """Remove the partial checkpoint; disk full, quota, permissions: say so in one line."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):  # earlier checkpoints are untouched
        raise OSError(e.errno, f"could not write checkpoint {final} ({e.strerror or e}); earlier checkpoints "
                               f"in {final.parent} are intact") from e


def _prune(output_dir, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, shards=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return its state.json (with
    the trainer's `extra` state under "extra", when the checkpoint has one).
    `shards`: the `Dist` of a sharded (FSDP) model; then every rank calls this, rank 0 alone reads
    the weights and optimizer state, and `Dist.load_state` hands each rank its shard.
    A sharded checkpoint (a `shards/` directory) is read by every rank, each its own part, whatever
    the number of processes that wrote it; under torchrun every rank must call this."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    kernels = [{k: g[k] for k in KERNEL_CHOICE if k in g} for g in optimizer.param_groups]
    if (path / SHARDS).is_dir():
        load_shards(model, optimizer, path / SHARDS)
        scheduler_file = path / "scheduler.pt"
    else:
        _load_whole(path, model, optimizer, shards)
        scheduler_file = path / "optimizer.pt"
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)  # this process's choice, not the writer's (see KERNEL_CHOICE)
    # mmap: the other ranks read just the (small) scheduler state, not the optimizer's tensors
    scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True, mmap=True)["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if (path / "extra.pt").exists():
        state["extra"] = torch.load(path / "extra.pt", weights_only=True)
    return state


def _load_whole(path: Path, model, optimizer, shards) -> None:
    """Weights and optimizer state of a full checkpoint (see `load_checkpoint`)."""
    weights = opt = None
    if shards is None or shards.main:
        weights = load_file(str(path / "model.safetensors"))
        missing = trainable_names(model) - set(weights)
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                             "it was made for another model")
        opt = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]
    if shards is None:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(opt)
    else:
        shards.load_state(model, optimizer, weights, opt)
