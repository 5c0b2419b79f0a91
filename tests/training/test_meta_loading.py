"""FSDP meta loading (#17): every rank builds the model on the meta device, shards it and fills its
own shards from the safetensors files, one tensor at a time; no process reads a whole model. Under
torchrun (gloo, 2 CPU processes): the same 5 SGD steps as one process without FSDP, plain and
LoRA, and a checkpoint split over several safetensors files loads the same."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directpo.toy import review_task, write_jsonl

FAULTS = Path(__file__).resolve().parents[1] / "faults" / "inject.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
_RUNS: dict = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=40, n_eval=8, seed=21)
    return write_jsonl(rows, tmp_path_factory.mktemp("meta") / "d.jsonl")


def _run(model: Path, data: Path, out: Path, nproc: int, lora: bool) -> tuple[list, dict, str]:
    """(train metrics, final weights, stderr) of 5 plain-SGD steps (the update is lr × the summed
    gradient, so a wrongly loaded or reduced weight shows in the weights); 2 processes run FSDP
    through tests/faults/inject.py, which reports what each rank held around sharding."""
    argv = ["train", "--model", str(model), "--data", str(data), "--lr", "0.5", "--optimizer", "sgd",
            "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5", "--warmup-steps", "0",
            "--max-grad-norm", "0", "--max-length", "64", "--no-progress", "--threads", "1", "--ref-cache", "off",
            "--output-dir", str(out), *(["--lora-r", "4", "--lora-alpha", "16"] if lora else [])]
    cmd = ([sys.executable, "-m", "directpo", *argv] if nproc == 1 else
           [*TORCHRUN, str(FAULTS), "--report-fsdp-init", *argv, "--fsdp"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["split"] == "train"]
    weights = load_file(str(out / ("adapter_model.safetensors" if lora else "model.safetensors")))
    return metrics, weights, p.stderr


def _cached(key, *args):
    if key not in _RUNS:
        _RUNS[key] = _run(*args)
    return _RUNS[key]


def _differences(one, two, start: dict | None) -> list[str]:
    """Where two runs differ by more than float re-association explains (the tolerances of the
    data-parallel equality test: loss and margin 1e-5 absolute, gradient norm 1e-4 relative, the
    weights within 1e-4 of the largest update). LoRA (`start` None): the adapters' update is
    measured from zero-initialised B, so against the largest adapter weight."""
    (a, wa, _), (b, wb, _) = one, two
    bad = [] if len(a) == len(b) == 5 else [f"{len(a)} vs {len(b)} metrics lines"]
    for x, y in zip(a, b):
        for key, tol in (("loss", 1e-5), ("rewards/margins", 1e-5), ("grad_norm", 1e-4 * x["grad_norm"])):
            if abs(x[key] - y[key]) > tol:
                bad.append(f"step {x['step']} {key}: {x[key]} vs {y[key]}")
    assert wa.keys() == wb.keys()
    scale = max(((wa[k] - start[k]) if start else wa[k]).abs().max().item() for k in wa)
    bad += [f"{k}: differ by {(wa[k] - wb[k]).abs().max().item():.2e} (scale {scale:.2e})"
            for k in wa if (wa[k] - wb[k]).abs().max().item() > 1e-4 * scale]
    return bad


def _held(err: str) -> dict[int, tuple[int, int, int]]:
    return {int(r): (int(a), int(b), int(c)) for r, a, b, c in re.findall(
        r"rank (\d): (\d+) parameter elements loaded before sharding, (\d+) held after; (\d+) whole-model loads",
        err)}


# The plain case is test_distributed's fsdp run again (the same 5 steps, equality and what each rank
# held), so it runs with `make test-slow` only.
@pytest.mark.parametrize("lora", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "lora"])
def test_meta_loaded_fsdp_run_matches_single_process(tiny_model, tmp_path, data, lora):
    one = _cached(("one", lora), tiny_model, data, tmp_path / "one", 1, lora)
    two = _cached(("two", lora), tiny_model, data, tmp_path / "two", 2, lora)
    start = load_file(str(tiny_model / "model.safetensors"))
    assert _differences(one, two, None if lora else start) == []
    # no rank read a whole model: nothing loaded before sharding, no from_pretrained, and after it
    # each holds half the weights, the LM head's half included (plus, with LoRA, half the adapters)
    held = _held(two[2])
    total = sum(t.numel() for t in start.values())
    assert sorted(held) == [0, 1] and all(h[0] == 0 and h[2] == 0 for h in held.values())
    if not lora:
        assert all(h[1] == pytest.approx(total / 2, rel=0.01) for h in held.values())


def test_a_checkpoint_split_over_several_files_loads_the_same(tiny_model, tmp_path, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = tmp_path / "split"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(split, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(split)
    index = json.loads((split / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2 and not (split / "model.safetensors").exists()
    whole = _cached(("two", False), tiny_model, data, tmp_path / "whole", 2, False)
    parts = _run(split, data, tmp_path / "parts", 2, False)
    # the same values loaded, the same arithmetic: bit-identical
    assert [m["loss"] for m in parts[0]] == [m["loss"] for m in whole[0]]
    assert all((parts[1][k] == whole[1][k]).all() for k in whole[1])


def test_a_ranks_rows_are_read_from_the_file_without_mapping_it(tmp_path):
    """`_read_rows` puts rows [start, stop) of a safetensors tensor straight into a shard's buffer
    with file reads (fp32, bf16, an empty share); it declines (reads nothing) what it cannot place
    as is (another dtype, another shape), and names a truncated file."""
    from safetensors.torch import save_file

    from directpo.safetensors_io import read_rows as _read_rows

    path = tmp_path / "m.safetensors"
    t = {"a": torch.randn(7, 3), "b": torch.randn(5, 2, 2).bfloat16(), "ids": torch.arange(6)}
    save_file(t, str(path))
    out = torch.full((3, 3), float("nan"))
    assert _read_rows(str(path), "a", (2, 5), out) and torch.equal(out, t["a"][2:5])
    out = torch.empty(2, 2, 2, dtype=torch.bfloat16)
    assert _read_rows(str(path), "b", (3, 5), out) and torch.equal(out, t["b"][3:5])
    assert _read_rows(str(path), "a", (7, 7), torch.empty(0, 3))  # the last rank's empty share
    untouched = torch.zeros(3, 3, dtype=torch.float64)
    assert not _read_rows(str(path), "a", (0, 3), untouched) and not untouched.any()
    assert not _read_rows(str(path), "a", (0, 2), torch.empty(2, 4))
    assert not _read_rows(str(path), "ids", (0, 2), torch.empty(2, dtype=torch.int64))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        _read_rows(str(cut), "b", (3, 5), torch.empty(2, 2, 2, dtype=torch.bfloat16))
