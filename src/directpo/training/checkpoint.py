"""Checkpoints that survive `kill -9` and resume bit-identically.

A checkpoint is a directory `OUTPUT/checkpoints/step-NNNNNNNN/` holding

    model.safetensors   the trainable weights (safetensors only: loading runs no code)
    optimizer.pt        optimizer and lr-scheduler state (read back with torch.load(weights_only=True))
    state.json          step, epoch and the config it was made with
    rng.pt              torch CPU (and CUDA) RNG states
    extra.pt            what else a trainer needs to continue exactly (PPO: value head, KL
                        coefficient, mini-batch generator), when it has any
    manifest.json       every other file's size and sha256, written last

or, with `--checkpoint-format sharded`, `shards/` (torch.distributed.checkpoint: every rank's
shards of the trainable weights and optimizer state, written by the ranks themselves, nothing
gathered; it loads on any number of processes) and `scheduler.pt` in place of the first two.

It is written into a temporary sibling directory and renamed into place only when complete: a
rename is atomic, so a checkpoint directory either exists whole or not at all, and a crash during a
write leaves the previous checkpoints untouched; older ones are pruned (`keep_last`) only after the
new one is in place. A write that fails (disk full, I/O error) removes the temporary directory and
says in one line which file, on which disk, needed how much (`diskio`).

Resuming checks a checkpoint against its manifest first (`check_checkpoint`): a truncated or
altered file is an error naming it and the newest intact checkpoint (`latest_good_checkpoint`
resumes that one). A checkpoint from before manifests is checked as far as its files tell.

The data position needs no saving: the batch of step k is a function of (seed, k) (`batch_order`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..console import log
from ..errors import UserError, UserValueError
from ..diskio import (MANIFEST, default_mode, dump_torch, fsync_dir, fsync_file, manifest_problem,
                      raise_write_error, tensor_bytes, warn_if_short, write_manifest)
from .distributed import load_shards, save_shards

PREFIX = "step-"
SHARDS = "shards"  # a sharded checkpoint's DCP directory


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    return _checkpoints_in(checkpoint_root(output_dir))


def _checkpoints_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the run's step-N checkpoints (a run that starts over: left, a later --resume would
    continue the old run); anything else in checkpoints/ stays. Returns what went."""
    found = list_checkpoints(output_dir)
    for path in found:
        shutil.rmtree(path)
    return found


def latest_checkpoint(output_dir: str | Path, verify: bool = True, last_good: bool = False) -> Path | None:
    """The newest checkpoint of the run in `output_dir` (None: there is none), checked against its
    manifest with `verify` (`check_checkpoint`). A damaged one is an error naming the bad file and
    the newest intact checkpoint to resume from instead; with `last_good`, that one is returned,
    with a warning."""
    found = list_checkpoints(output_dir)
    if not found or not verify:
        return found[-1] if found else None
    newest = found[-1]
    problem = checkpoint_problem(newest)
    if problem is None:
        return newest
    if not last_good:
        raise CheckpointError(_damaged(newest, problem))
    for older in reversed(found[:-1]):
        if checkpoint_problem(older) is None:
            log(f"warning: checkpoint {newest} is damaged ({problem}); resuming from the newest intact one, {older}")
            return older
    raise CheckpointError(_damaged(newest, problem))


def latest_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes `check_checkpoint` (damaged newer ones skipped, with a
    warning): what `--resume-from-last-good` resumes."""
    return latest_checkpoint(output_dir, last_good=True)


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
    optim_state = _without_kernel_choice(optim_state)
    draft = _Draft(output_dir, step, str(os.getpid()), tensor_bytes(weights) + tensor_bytes(optim_state))
    try:
        draft.put("model.safetensors", lambda p: save_file(weights, str(p)))
        draft.put("optimizer.pt", lambda p: dump_torch({"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                                                       p))
        _finish(draft, step, epoch, config, extra)
    except BaseException as e:
        draft.failed(e)
        raise
    _prune(output_dir, keep_last)  # only now: the new checkpoint is whole on disk
    return draft.final


def save_sharded_checkpoint(output_dir: str | Path, step: int, epoch: int, model, optimizer, scheduler,
                            config: dict, d, keep_last: int = 0, extra: dict | None = None) -> Path:
    """The sharded format: every process calls (`d`: its `Dist`). All ranks write their shards into
    one temporary directory (the same name on every rank), then rank 0 adds the small files and
    renames it into place, as `save_checkpoint` does: a crash on any rank at any point leaves no
    checkpoint directory for this step, and the earlier ones whole."""
    # the whole state's size (a DTensor counts whole): the ranks write onto one shared folder
    needed = tensor_bytes(_trainable_refs(model)) + tensor_bytes(optimizer.state_dict()) if d.main else 0
    draft = _Draft(output_dir, step, "sharded", needed, main=d.main)
    d.barrier()  # the directory exists (and holds nothing stale) before any rank writes into it
    try:
        draft.put(SHARDS, lambda p: save_shards(model, optimizer, p))  # returns when every rank's files are written
        if d.main:
            draft.put("scheduler.pt", lambda p: dump_torch({"scheduler": scheduler.state_dict()}, p))
            _finish(draft, step, epoch, config, extra)
    except BaseException as e:
        if d.main:
            draft.failed(e)
        raise
    if d.main:
        _prune(output_dir, keep_last)
    return draft.final


def _trainable_refs(model) -> dict:
    """The trainable tensors of `model` as they are (no copies, DTensors left sharded): for sizes."""
    names = trainable_names(model)
    return {n: t for n, t in model.state_dict().items() if n in names}


class _Draft:
    """A checkpoint being written into its temporary sibling directory. `put` writes one file of it
    and remembers which, so a failed write names the file; `failed` removes the directory."""

    def __init__(self, output_dir, step: int, tag: str, needed: int, main: bool = True):
        root = checkpoint_root(output_dir)
        self.final, self.tmp = root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}-{tag}"
        self.needed, self.current = needed, ""
        if main:
            root.mkdir(parents=True, exist_ok=True)
            warn_if_short(root, needed, f"checkpoint {self.final}")
            if self.tmp.exists():  # left by a process killed mid-write
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()

    def put(self, name: str, write) -> None:
        self.current = name
        write(self.tmp / name)

    def failed(self, e: BaseException) -> None:
        """Remove the partial checkpoint (first: the space it held is free again when the error
        counts it); a full disk, a quota, an I/O error: one line naming the file."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        note = f"; earlier checkpoints in {self.final.parent} are intact"
        raise_write_error(e, self.final / self.current, self.needed, note)
        if isinstance(e, OSError):  # one without an errno
            raise OSError(e.errno, f"could not write checkpoint {self.final} ({e.strerror or e}){note}") from e


def _finish(draft: _Draft, step: int, epoch: int, config: dict, extra: dict | None) -> None:
    """RNG, extra state, state.json and last the manifest into the draft, everything fsynced, then
    the draft renamed to its final name."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    draft.put("rng.pt", lambda p: dump_torch(rng, p))
    if extra is not None:
        draft.put("extra.pt", lambda p: dump_torch(extra, p))
    state = json.dumps({"step": step, "epoch": epoch, "config": config}, indent=1)
    draft.put("state.json", lambda p: p.write_text(state))
    draft.put(MANIFEST, lambda p: write_manifest(p.parent))  # last: it describes every file above
    tmp, final = draft.tmp, draft.final
    draft.current = ""
    for f in tmp.iterdir():  # (DCP fsyncs the shards it writes; its directory entry is synced here)
        if f.is_dir():
            fsync_dir(f)
        else:
            fsync_file(f)
            default_mode(f)  # safetensors writes 0600
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _prune(output_dir, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, shards=None, verify: bool = True) -> dict:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return its state.json (with
    the trainer's `extra` state under "extra", when the checkpoint has one).
    `shards`: the `Dist` of a sharded (FSDP) model; then every rank calls this, rank 0 alone reads
    the weights and optimizer state, and `Dist.load_state` hands each rank its shard.
    A sharded checkpoint (a `shards/` directory) is read by every rank, each its own part, whatever
    the number of processes that wrote it; under torchrun every rank must call this.
    `verify`: check the checkpoint first (`check_checkpoint`; once per process: a checkpoint that
    `latest_checkpoint` verified is not read twice)."""
    path = Path(path)
    if verify:
        check_checkpoint(path)
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
            raise UserValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                                 "it was made for another model")
        opt = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]
    if shards is None:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(opt)
    else:
        shards.load_state(model, optimizer, weights, opt)


# ---- integrity: is a checkpoint on disk what was written? ----

FALLBACK_FLAG = "--resume-from-last-good"
_PT_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "extra.pt")
# checkpoint -> its files' (name, size, mtime) when it last passed: one verification per process, though
# resuming looks at the checkpoint three times (its precision, its settings, its tensors)
_VERIFIED: dict[str, tuple] = {}


class CheckpointError(UserError, ValueError):
    """A damaged checkpoint (one line in the CLI: which file, and which checkpoint to use instead)."""


def check_checkpoint(path: str | Path) -> None:
    """Raise `CheckpointError` naming the bad file of checkpoint `path` (truncated, altered, missing,
    unreadable) and the newest intact checkpoint beside it."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(_damaged(Path(path), problem))


def checkpoint_state(path: str | Path, verify: bool = True) -> dict:
    """state.json of checkpoint `path` (step, epoch, config), after `check_checkpoint`."""
    if verify:
        check_checkpoint(path)
    return json.loads((Path(path) / "state.json").read_text())


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with checkpoint `path`, naming the file (None: nothing). With a manifest: every
    file's size, then its sha256. Without one (made before manifests): that each file reads, as far
    as that can be told without loading it (a safetensors file's length against its header, the
    CRCs of torch's zip records). Under torchrun rank 0 alone hashes (every rank reading every byte
    would multiply the cost); the others check sizes, and torchrun stops them when rank 0 fails."""
    path = Path(path)
    key, signature = str(path.resolve()), _signature(path)
    if _VERIFIED.get(key) == signature:
        return None
    problem = _state_problem(path)
    if problem is None and (path / MANIFEST).exists():
        problem = manifest_problem(path, hashes=os.environ.get("RANK", "0") == "0")
    elif problem is None:
        problem = _legacy_problem(path)
    if problem is None:
        _VERIFIED[key] = signature
    return problem


def _signature(path: Path) -> tuple:
    try:
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())
    except OSError:
        return ()


def _damaged(path: Path, problem: str) -> str:
    """The error for a damaged checkpoint: what is wrong, and what to resume from instead."""
    others = [p for p in reversed(_checkpoints_in(path.parent)) if p.name != path.name]
    good = next((p for p in others if checkpoint_problem(p) is None), None)
    text = f"checkpoint {path} is damaged: {problem}"
    if good is None:
        return f"{text}; no other checkpoint in {path.parent} is intact: start the run again (--overwrite)"
    return f"{text}; the newest intact checkpoint is {good}: resume from it with --resume {good} (or {FALLBACK_FLAG})"


def _state_problem(path: Path) -> str | None:
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state["step"], int) or not isinstance(state["config"], dict):
            raise ValueError("no step or config")
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json is unreadable ({type(e).__name__}: {e})"
    return None


def _legacy_problem(path: Path) -> str | None:
    """A checkpoint without a manifest: its files are there and read (see `checkpoint_problem`)."""
    sharded = (path / SHARDS).is_dir()
    needed = ["scheduler.pt", "rng.pt", f"{SHARDS}/.metadata"] if sharded else \
        ["model.safetensors", "optimizer.pt", "rng.pt"]
    for name in needed:
        if not (path / name).is_file():
            return f"{name} is missing"
    if not sharded:
        problem = _safetensors_problem(path / "model.safetensors")
        if problem:
            return f"model.safetensors {problem}"
    for name in _PT_FILES:
        if (path / name).is_file():
            problem = _zip_problem(path / name)
            if problem:
                return f"{name} {problem}"
    return None


def _safetensors_problem(f: Path) -> str | None:
    """A safetensors file's length against the one its header promises (8 bytes of header length,
    the JSON header, the data up to the largest end offset)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                return f"is truncated ({size} bytes, shorter than its header)"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"is unreadable (not a safetensors file: {type(e).__name__})"
    if size != 8 + n + end:
        return f"is {'truncated' if size < 8 + n + end else 'longer than written'} ({size} of {8 + n + end} bytes)"
    return None


def _zip_problem(f: Path) -> str | None:
    """torch.save's files are zip archives with a CRC-32 per record: a cut or altered file fails."""
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"is truncated or corrupt ({e})"
    return f"is corrupt (its record {bad} fails its CRC check)" if bad else None
