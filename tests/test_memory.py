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
    assert calls == [memory.BUDGET_MMAP_THRESHOLD, memory.DYNAMIC_MMAP_THRESHOLD_MAX]
    assert "glibc's mmap threshold fixed at 64 KiB" in capsys.readouterr().err
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "plain")))
    assert calls == [memory.BUDGET_MMAP_THRESHOLD, memory.DYNAMIC_MMAP_THRESHOLD_MAX]  # no budget: untouched


class _Recorder:
    """A stand-in C library recording the mmap thresholds set."""

    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, param, value):
        assert param == memory.M_MMAP_THRESHOLD
        self.calls.append(value)
        return 1
