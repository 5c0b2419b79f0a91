"""TR-DPO (Gorbatovski et al. 2024): the reference moves towards the policy every N steps; it then
runs live, is part of every checkpoint, and a killed run resumes bit-identically."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directpo.cli import main
from directpo.toy import review_task, write_jsonl
from directpo.training.loop import sync_reference

FAULTS = Path(__file__).resolve().parents[1] / "faults" / "inject.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=16, n_eval=4, seed=5)
    return write_jsonl(rows, tmp_path_factory.mktemp("trdpo") / "d.jsonl")


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--micro-batch-size", "4", "--max-length", "64", "--lr", "1e-3", "--optimizer", "adamw",
            "--warmup-steps", "0", "--no-progress", "--threads", "1", *extra]


def test_sync_mixes_weights():
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    sync_reference(ref, pol, 0.25)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * pol.state_dict()[k])
    sync_reference(ref, pol, 1.0)
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in ref.state_dict().items())


def test_hard_sync_every_step_makes_every_step_start_at_ln2(tiny_model, data, tmp_path):
    """α = 1, every step: πref = πθ at the start of each step, so each step's loss is ln 2 and each
    margin 0 (a fixed reference would give falling losses)."""
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, "--max-steps", "4", "--ref-sync-every", "1", "--ref-sync-mix", "1")) == 0
    m = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert all(x["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(x["rewards/margins"]) < 1e-6 for x in m)
    cfg = json.loads((out / "directpo_config.json").read_text())
    assert cfg["reference_mode"].startswith("live, TR-DPO")
    fixed = tmp_path / "fixed"
    assert main(_argv(tiny_model, data, fixed, "--max-steps", "4")) == 0
    assert json.loads((fixed / "metrics.jsonl").read_text().splitlines()[-1])["loss"] < math.log(2) - 1e-3


def test_killed_trdpo_run_resumes_bit_identical(tiny_model, data, tmp_path):
    args = ["--max-steps", "6", "--save-every", "1", "--ref-sync-every", "2", "--ref-sync-mix", "0.5"]
    full = subprocess.run([sys.executable, "-m", "directpo", *_argv(tiny_model, data, tmp_path / "full", *args)],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, str(FAULTS), "--kill-during-save", "5", *_argv(tiny_model, data, out, *args)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    # step 4's checkpoint holds the reference as synced after step 4; steps 5-6 need it exactly
    res = subprocess.run([sys.executable, "-m", "directpo", *_argv(tiny_model, data, out, *args, "--resume")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step 4" in res.stderr
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "full" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert la == lb


@pytest.mark.parametrize("extra, says", [(["--loss", "simpo", "--beta", "2"], "no reference")])
def test_refused_where_it_cannot_work(tiny_model, data, tmp_path, capsys, extra, says):
    rc = main(_argv(tiny_model, data, tmp_path / "o", "--ref-sync-every", "2", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and "--ref-sync-every" in err and says in err
