"""directpo.memory: the C heap of a CPU run under --memory-budget (glibc's mmap threshold fixed so
freed temporaries go back to the system), and a budget run saying so."""
import platform
import subprocess
import sys

import pytest

from directpo import memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# A forward in miniature: each "layer" frees two temporaries (4-8 MiB, 1 MiB) around the activations it
# keeps (256 KiB-1 MiB). Run in its own interpreter: mallopt changes the whole process.
_FRAGMENT = r"""
import sys, torch
from directpo.memory import bound_heap, release_heap
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
note = bound_heap() if sys.argv[1] == "bound" else None
torch.ones(1)
base, keep, kept = anon(), [], 0
for i in range(48):
    t = torch.ones((i % 5 + 4) * 2 ** 18)
    u = torch.ones(2 ** 18)
    keep.append(torch.ones((i % 3 + 1) * 2 ** 16)); kept += keep[-1].numel() * 4
    del t
    keep.append(torch.ones(2 ** 17)); kept += keep[-1].numel() * 4
    del u
print(anon() - base, kept, note is not None)
release_heap()
"""


def _held(mode: str) -> tuple[int, int, bool]:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
    held, kept, bound = out.stdout.split()
    return int(held), int(kept), bound == "True"


@glibc
def test_a_bounded_heap_holds_what_the_tensors_need_and_the_default_heap_more():
    held, kept, bound = _held("bound")
    assert bound
    assert held <= kept + 2 * memory.MiB  # (page rounding and the interpreter's own small blocks)
    held_default, kept_default, _ = _held("default")
    assert kept_default == kept and held_default > held  # the holes glibc keeps, which the bound gives back


def test_a_threshold_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.bound_heap() is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert memory.bound_heap() is None


@glibc
def test_a_cpu_training_run_with_a_budget_bounds_the_heap_and_lets_it_go(tiny_model, tmp_path, monkeypatch, capsys):
    from directpo.training import TrainConfig, train

    calls = []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(memory, "_glibc", lambda: _Recorder(calls))  # (not this test process's real heap)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "chosen": " c", "rejected": " d"}\n' * 4)
    cfg = dict(model=str(tiny_model), data=str(data), batch_size=2, micro_batch_size=2, max_steps=1, progress=False,
               device="cpu", ref_cache="off")
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "budget"), memory_budget="64GiB"))
    mmap, trim = memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD
    assert calls == [(mmap, memory.BUDGET_MMAP_THRESHOLD), (mmap, memory.DYNAMIC_MMAP_THRESHOLD_MAX)]
    assert "glibc's mmap threshold fixed at 64 KiB" in capsys.readouterr().err
    calls.clear()
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "plain")))  # no budget: the heap kept, then returned
    assert calls == [(mmap, memory.DYNAMIC_MMAP_THRESHOLD_MAX), (trim, memory.KEEP_TRIM_THRESHOLD),
                     (mmap, memory.DYNAMIC_MMAP_THRESHOLD_MAX), (trim, 2 * memory.DYNAMIC_MMAP_THRESHOLD_MAX), "trim"]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own setting stands
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "theirs")))
    assert calls == []


class _Recorder:
    """A stand-in C library recording the thresholds set and the trims."""

    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, param, value):
        assert param in (memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD)
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append("trim")
        return 1


# Steps in miniature: 100 MB of activations made and freed, eight times, after one 33 MiB block
# took glibc's dynamic thresholds to their ceiling (mmap 32 MiB, trim 64 MiB), as a model's load
# does; the page faults of the last six steps, and the resident memory before and after the run's
# end (`release_heap`). Run in its own interpreter: mallopt changes the whole process.
_STEPS = r"""
import resource, torch
from directpo.memory import keep_heap, release_heap
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
keep_heap(torch.device("cpu"))
big = torch.ones(33 * 2 ** 18)
del big
faults = []
for step in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    acts = [torch.ones(1000, 1000) for _ in range(25)]  # 4 MB each
    del acts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
held = anon()
release_heap()
print(sum(faults[2:]), held - anon())
"""


@glibc
def test_a_kept_heap_gives_the_next_step_its_pages_and_returns_them_after_the_run():
    """Under glibc's defaults such steps fault their 24,400 pages in anew whenever the heap's free top
    went back to the system (how often depends on where the process's mappings fell: 0-6 of the 6
    steps in repeated runs of this test); kept, none does; after the run the memory goes back."""
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True)
    faults, returned = map(int, out.stdout.split())
    assert faults < 5_000  # (measured: ~1,000 over the six steps, 24,400 a step when trimmed)
    assert returned > 80 * memory.MiB  # the kept 100 MB returned at the run's end
