"""Run `directpo ARGS...` with a fault injected, for the never-lose-work tests (the package itself
carries no test hooks).

    python tests/faults/inject.py [--kill-during-save N] [--report-fsdp-init] ARGS...

--kill-during-save N   SIGKILL this process right after it wrote the weights of checkpoint N (or
                       its shards, --checkpoint-format sharded), before the rest of it (mid-write)
--break-all-reduce M   data parallelism done wrong, to show the equality tests catch it: M = skip
                       (no gradient all-reduce) or mean (gradients averaged over ranks, not summed)
--report-fsdp-init     print, per rank, how many parameter elements it held before and after
                       FSDP sharding, how many whole models it had read with from_pretrained by
                       then, and its peak RSS

Works as a torchrun script too: `python -m torch.distributed.run ... tests/faults/inject.py ARGS...`.
"""
from __future__ import annotations

import os
import resource
import signal
import sys


def kill_during_save(step: int) -> None:
    from directpo.train import checkpoint

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


def break_all_reduce(mode: str) -> None:
    from directpo.train.distributed import Dist

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

    from directpo.train.distributed import Dist

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
    while argv and argv[0] in ("--kill-during-save", "--break-all-reduce", "--report-fsdp-init"):
        if argv[0] == "--kill-during-save":
            kill_during_save(int(argv[1]))
            argv = argv[2:]
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
