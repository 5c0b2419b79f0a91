"""Data-parallel training with torchrun (gloo, 2 CPU processes) equals single-process training."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from directpo.toy import review_task, write_jsonl
from directpo.train.distributed import Dist


def test_shards_cover_each_example_once():
    idx = list(range(11))
    shards = [Dist(rank=r, world=3).shard(idx) for r in range(3)]
    assert sorted(sum(shards, [])) == idx
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(shards) for b in shards[i + 1:])


@pytest.mark.parametrize("mode", ["ddp", "ddp-live-ref", "fsdp"])
def test_two_process_run_matches_single_process(tiny_model, tmp_path, mode):
    rows, _ = review_task(n_train=40, n_eval=8, seed=21)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    common = ["--model", str(tiny_model), "--data", str(data), "--lr", "1e-3", "--optimizer", "adamw",
              "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5", "--warmup-steps", "0",
              "--max-length", "64", "--no-progress", "--threads", "1"]
    if mode == "ddp-live-ref":
        common.append("--no-precompute-ref")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, "-m", "directpo", "train", *common, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "directpo", "train", *common, "--output-dir", str(tmp_path / "two"),
                            "--nproc", "2", *(["--fsdp", "--eval-data", str(data), "--eval-every", "2"]
                                              if mode == "fsdp" else [])], capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    b = [m for m in b if m["split"] == "train"]
    assert len(a) == len(b) == 5  # rank 0 alone writes
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-5)
        assert x["tokens_per_s"] > 0 and y["tokens_per_s"] > 0
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
