"""Never lose work: atomic checkpoints, bit-identical resume after kill -9, NaN guard, clear failures."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directpo import losses
from directpo.toy import review_task, write_jsonl
from directpo.training import TrainConfig, train
from directpo.training.checkpoint import list_checkpoints
from directpo.training.loop import NonFiniteError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=40, n_eval=1, seed=9)
    return write_jsonl(rows, tmp_path_factory.mktemp("ck") / "d.jsonl")


def _argv(model, data, out, steps=6, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", str(steps),
            "--warmup-steps", "2", "--max-length", "64", "--save-every", "1", "--no-progress", *extra]


FAULTS = Path(__file__).resolve().parents[1] / "faults" / "inject.py"


def _run(argv, kill_during_save=None, wait=True):
    """`directpo ARGV` in a fresh process; with `kill_during_save=N` it SIGKILLs itself mid-write of
    checkpoint N (tests/faults/inject.py)."""
    cmd = [sys.executable, "-m", "directpo"] if kill_during_save is None else \
        [sys.executable, str(FAULTS), "--kill-during-save", str(kill_during_save)]
    p = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = p.communicate(timeout=300)
        return p.returncode, err
    return p


def _weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_mid_checkpoint_write_then_resume_is_bit_identical(tiny_model, data, tmp_path):
    rc, err = _run(_argv(tiny_model, data, tmp_path / "full"))
    assert rc == 0, err
    out = tmp_path / "killed"
    rc, _ = _run(_argv(tiny_model, data, out), kill_during_save=3)
    assert rc == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]  # step 3 never appeared
    assert not (out / "model.safetensors").exists()
    rc, err = _run(_argv(tiny_model, data, out, 6, "--resume"))
    assert rc == 0, err
    assert "resumed from" in err and "step 2" in err
    _same(_weights(tmp_path / "full"), _weights(out))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # no duplicated or lost metrics lines
    full = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert [m["loss"] for m in lines] == [m["loss"] for m in full]


def test_kill_at_a_random_moment_then_resume_is_bit_identical(tiny_model, data, tmp_path):
    rc, _ = _run(_argv(tiny_model, data, tmp_path / "full", 8))
    assert rc == 0
    out = tmp_path / "killed"
    p = _run(_argv(tiny_model, data, out, 8), wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(out)) < 3:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    rc, err = _run(_argv(tiny_model, data, out, 8, "--resume"))
    assert rc == 0, err
    _same(_weights(tmp_path / "full"), _weights(out))


def test_nan_stops_and_leaves_last_checkpoint_intact(tiny_model, data, tmp_path, monkeypatch):
    real = losses.LOSSES["dpo"]
    calls = {"n": 0}

    def poisoned(x, p):
        calls["n"] += 1
        out = real.fn(x, p)
        if calls["n"] > 4:  # micro-batches 5 and 6 = step 3
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setitem(losses.LOSSES, "dpo", losses.LossSpec(poisoned))
    cfg = dict(model=str(tiny_model), data=str(data), lr=1e-3, optimizer="adamw", batch_size=8, micro_batch_size=4,
               max_steps=5, max_length=64, save_every=1, progress=False)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train(TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    ck = list_checkpoints(tmp_path / "a")
    assert [p.name for p in ck] == ["step-00000001", "step-00000002"]
    assert all(torch.isfinite(t).all() for t in load_file(str(ck[-1] / "model.safetensors")).values())
    calls["n"] = 0
    result = train(TrainConfig(output_dir=str(tmp_path / "b"), skip_nonfinite=True, **cfg))
    assert result["skipped_nonfinite_steps"] == 3
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "b").values())


def test_keep_last_and_refusals(tiny_model, data, tmp_path):
    rc, _ = _run(_argv(tiny_model, data, tmp_path / "k", 4, "--keep-last", "2"))
    assert rc == 0
    assert [p.name for p in list_checkpoints(tmp_path / "k")] == ["step-00000003", "step-00000004"]
    rc, err = _run(_argv(tiny_model, data, tmp_path / "k", 4))
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    rc, err = _run(_argv(tiny_model, data, tmp_path / "k", 6, "--resume", "--beta", "0.5"))
    assert rc == 2 and "beta: 0.1 -> 0.5" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _run(_argv(tiny_model, data, blocker / "out", 1))
    assert rc == 2 and "cannot write to output directory" in err


def test_mismatched_tokenizer_and_unsafe_weights(tiny_model, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from directpo.toy import build_tiny_model

    big = build_tiny_model(tmp_path / "big", [f"word{i} thing{i}" for i in range(400)], vocab_size=900)
    small_model = AutoModelForCausalLM.from_pretrained(tiny_model)
    mixed = tmp_path / "mixed"
    small_model.save_pretrained(mixed)
    for f in big.iterdir():
        if "token" in f.name:
            (mixed / f.name).write_bytes(f.read_bytes())
    rc, err = _run(_argv(mixed, data, tmp_path / "o1", 1))
    assert rc == 2 and "do not belong together" in err
    pickled = tmp_path / "pickled"
    small_model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(small_model.state_dict(), pickled / "pytorch_model.bin")
    for f in Path(tiny_model).iterdir():
        if "token" in f.name:
            (pickled / f.name).write_bytes(f.read_bytes())
    rc, err = _run(_argv(pickled, data, tmp_path / "o2", 1))
    assert rc == 2 and "safetensors" in err


def test_disk_full_during_checkpoint_keeps_earlier_ones(tiny_model, data, tmp_path, monkeypatch):
    import errno

    from directpo.training import checkpoint

    real = checkpoint.torch.save
    state = {"n": 0}

    def full_disk(obj, f, *a, **k):
        if "optimizer" in str(f):
            state["n"] += 1
            if state["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    cfg = TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "o"), lr=1e-3,
                      optimizer="adamw", batch_size=8, micro_batch_size=4, max_steps=5, max_length=64, save_every=1,
                      progress=False)
    with pytest.raises(OSError, match="No space left on device.*earlier checkpoints .* are intact"):
        train(cfg)
    names = [p.name for p in (tmp_path / "o" / "checkpoints").iterdir()]
    assert sorted(names) == ["step-00000001", "step-00000002"]  # no half-written step-3, no temp dir
    for ck in list_checkpoints(tmp_path / "o"):
        assert load_file(str(ck / "model.safetensors"))
