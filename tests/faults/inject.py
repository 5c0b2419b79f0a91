"""Run `directpo ARGS...` with a fault injected, for the never-lose-work tests (the package itself
carries no test hooks).

    python tests/faults/inject.py [--kill-during-save N] [--enospc-at-checkpoint N] [--enospc-at-final-save]
                                  [--report-fsdp-init] ARGS...

--kill-during-save N   SIGKILL this process right after it wrote the weights of checkpoint N (or
                       its shards, --checkpoint-format sharded), before the rest of it (mid-write)
--enospc-at-checkpoint N
                       the disk fills up while checkpoint N writes its optimizer state: torch.save
                       gets ENOSPC from the file half-way and reports it as torch does ("unexpected
                       pos"); the disk reports 0.2 MB free throughout (so the free-space warning fires)
--enospc-at-final-save the disk fills up while the final model's weights are written: safetensors
                       leaves a partial file and raises its own "No space left on device (os error
                       28)"; the FSDP export's stream gets ENOSPC from the file
--break-all-reduce M   data parallelism done wrong, to show the equality tests catch it: M = skip
                       (no gradient all-reduce) or mean (gradients averaged over ranks, not summed)
--report-fsdp-init     print, per rank, how many parameter elements it held before and after
                       FSDP sharding, how many whole models it had read with from_pretrained by
                       then, and its peak RSS

Works as a torchrun script too: `python -m torch.distributed.run ... tests/faults/inject.py ARGS...`.
"""
from __future__ import annotations

import errno
import os
import resource
import signal
import sys


def kill_during_save(step: int) -> None:
    from directpo.training import checkpoint

    real = checkpoint.save_file

    def save_file(tensors, path, *a, **kw):
        real(tensors, path, *a, **kw)
        if f"step-{step:08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_file

    # --checkpoint-format sharded: every rank dies right after its shards are written, before
    # rank 0 adds the rest and renames the directory into place
    real_shards = checkpoint.save_shards

    def save_shards(model, optimizer, path):
        real_shards(model, optimizer, path)
        if f"step-{step:08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_shards = save_shards


NEARLY_FULL = 200_000  # bytes free, as the disk reports it under --enospc-*: less than the test model needs


def nearly_full_disk() -> None:
    import shutil

    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - NEARLY_FULL, NEARLY_FULL)

    shutil.disk_usage = disk_usage


class FillsUp:
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC). Also used in process
    by tests/faults/test_disk_and_checkpoints.py."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def enospc_at_checkpoint(step: int) -> None:
    import torch

    nearly_full_disk()
    real = torch.save

    def save(obj, f, *a, **kw):
        if f"step-{step:08d}" in str(f) and "optimizer" in str(f):
            f = FillsUp(f, 1000)
        return real(obj, f, *a, **kw)

    torch.save = save


def enospc_at_final_save() -> None:
    import importlib

    from safetensors import SafetensorError

    from directpo.training import export

    nearly_full_disk()

    def safe_save_file(tensors, filename, *a, **kw):
        with open(filename, "wb") as f:  # what a writer that is not atomic would leave behind
            f.write(b"\0" * 4096)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    for name in ("transformers.modeling_utils", "peft.peft_model", "peft.utils.save_and_load"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "safe_save_file"):
            module.safe_save_file = safe_save_file
    real_open = export.SafetensorsStream.open

    def stream_open(self, path):
        close = real_open(self, path)
        self.file = FillsUp(self.file, 4096)
        return close

    export.SafetensorsStream.open = stream_open


def break_all_reduce(mode: str) -> None:
    from directpo.training.distributed import Dist

    real = Dist.all_reduce_grads

    def all_reduce_grads(self, params):
        if mode == "skip":
            return
        real(self, params)
        for p in params:
            if p.grad is not None:
                p.grad /= self.world

    Dist.all_reduce_grads = all_reduce_grads


def report_fsdp_init() -> None:
    import transformers

    from directpo.training.distributed import Dist

    real = Dist.shard_model
    whole_loads = []  # from_pretrained reads a whole model into one process
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        whole_loads.append(1)
        return real_from_pretrained(cls, *a, **kw)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)

    def shard_model(self, model, **knobs):
        loaded = sum(p.numel() for p in model.parameters() if not p.is_meta)
        model = real(self, model, **knobs)
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB
        print(f"[faults] rank {self.rank}: {loaded} parameter elements loaded before sharding, {held} held after; "
              f"{len(whole_loads)} whole-model loads; peak RSS {rss} MiB", file=sys.stderr, flush=True)
        return model

    Dist.shard_model = shard_model


def main(argv: list[str]) -> int:
    while argv and argv[0] in ("--kill-during-save", "--break-all-reduce", "--report-fsdp-init",
                               "--enospc-at-checkpoint", "--enospc-at-final-save"):
        if argv[0] == "--kill-during-save":
            kill_during_save(int(argv[1]))
            argv = argv[2:]
        elif argv[0] == "--enospc-at-checkpoint":
            enospc_at_checkpoint(int(argv[1]))
            argv = argv[2:]
        elif argv[0] == "--enospc-at-final-save":
            enospc_at_final_save()
            argv = argv[1:]
        elif argv[0] == "--break-all-reduce":
            break_all_reduce(argv[1])
            argv = argv[2:]
        else:
            report_fsdp_init()
            argv = argv[1:]
    from directpo.cli import main as directpo_main

    return directpo_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
