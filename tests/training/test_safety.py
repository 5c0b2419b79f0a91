"""Runs do what the user meant or stop with one clear line: bad numbers refused up front, a
diverging run stopped, Ctrl-C saves a checkpoint, --resume never silently starts over, crashed
checkpoint writes cleaned up."""
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import review_pairs, train_argv
import torch
from safetensors.torch import load_file

from directpo.cli import main
from directpo.toy import review_task, write_jsonl
from directpo.training.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_pairs(tmp_path_factory.mktemp("safety"))


_argv = train_argv


@pytest.mark.parametrize("flag, value, says", [
    ("--max-steps", "-1", "≥ 1"), ("--max-steps", "0", "≥ 1"), ("--label-smoothing", "0.7", "≥ 0 and < 0.5"),
    ("--sft-weight", "-1", "≥ 0"), ("--lr", "0", "> 0"), ("--lr", "-1e-4", "> 0"), ("--warmup-steps", "-1", "≥ 0"),
    ("--max-grad-norm", "-1", "≥ 0"), ("--save-every", "-2", "≥ 0"), ("--keep-last", "-1", "≥ 0"),
    ("--micro-batch-tokens", "-5", "≥ 0"), ("--nproc", "-1", "≥ 0"), ("--threads", "-3", "≥ 0"),
    ("--beta", "0", "> 0"), ("--epochs", "0", "> 0"), ("--lora-dropout", "1", "≥ 0 and < 1"),
])
def test_bad_numbers_are_refused_before_anything_loads(tmp_path, capsys, flag, value, says):
    rc = main(["train", "--model", "no/such-model", "--data", "nosuch.jsonl", "--output-dir", str(tmp_path / "o"),
               flag, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert f"{flag} must be {says}" in err and value.lstrip("-").split("e")[0] in err


def test_device_that_is_not_there_is_one_line(tiny_model, data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(_argv(tiny_model, data, tmp_path / "o", "--device", "cuda"))
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "Traceback" not in err


def test_divergence_stops_with_a_hint_and_keeps_the_last_checkpoint(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(_argv(tiny_model, data, out, "--lr", "1e3", "--optimizer", "sgd", "--max-steps", "6",
                    "--save-every", "1", "--max-grad-norm", "0"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("directpo train: error:")][0]
    assert "diverged" in line or "non-finite" in line
    assert "--lr" in line
    assert not (out / "model.safetensors").exists()  # a diverged model is not handed out as the result
    ckpts = list_checkpoints(out)
    assert ckpts and all(torch.isfinite(t).all() for t in load_file(str(ckpts[-1] / "model.safetensors")).values())
    m = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(m) == len(ckpts)  # every applied step was checkpointed; the refused one was not applied


def test_divergence_guard_can_be_switched_off(tiny_model, data, tmp_path, capsys):
    # the same run with the guard off goes on to its last step; what it made is then not saved as a
    # model: its weights grew a million-fold (the check before every save, issue #27)
    out = tmp_path / "o"
    rc = main(_argv(tiny_model, data, out, "--lr", "1e3", "--optimizer", "sgd", "--max-steps", "3",
                    "--max-grad-norm", "0", "--divergence-factor", "0", "--skip-nonfinite"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 or "skipped" in capsys.readouterr().err
    assert rc == 2 and not (out / "model.safetensors").exists()


def test_resume_into_a_run_without_checkpoints_is_refused(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, "--max-steps", "2")) == 0
    before = load_file(str(out / "model.safetensors"))
    metrics = (out / "metrics.jsonl").read_text()
    rc = main(_argv(tiny_model, data, out, "--max-steps", "2", "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint to resume in" in err and "--overwrite" in err
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before) and (out / "metrics.jsonl").read_text() == metrics
    # a fresh directory with --resume just starts (idempotent restarts of a script)
    assert main(_argv(tiny_model, data, tmp_path / "fresh", "--max-steps", "1", "--resume")) == 0


def test_leftover_temporary_checkpoints_are_cleaned(tiny_model, data, tmp_path):
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, "--max-steps", "2", "--save-every", "1")) == 0
    junk = out / "checkpoints" / ".tmp-step-00000003-12345"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    assert main(_argv(tiny_model, data, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert not junk.exists()
    assert [p.name for p in list_checkpoints(out)][-1] == "step-00000003"


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_bit_identical(tiny_model, data, tmp_path):
    """SIGINT mid-run: the step finishes, a checkpoint is written, the exit says how to resume (130);
    --resume then ends exactly where an uninterrupted run ends."""
    args = ["--lr", "1e-3", "--optimizer", "adamw", "--max-steps", "40", "--micro-batch-size", "1"]
    full = subprocess.run([sys.executable, "-m", "directpo", *_argv(tiny_model, data, tmp_path / "full", *args)],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "-m", "directpo", *_argv(tiny_model, data, out, *args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert "interrupted at step" in line and "resume with --resume" in line and "Traceback" not in err
    step = int(line.split("interrupted at step ")[1].split("/")[0])
    assert 3 <= step < 40 and [c.name for c in list_checkpoints(out)] == [f"step-{step:08d}"]
    assert not (out / "model.safetensors").exists()
    res = subprocess.run([sys.executable, "-m", "directpo", *_argv(tiny_model, data, out, *args, "--resume")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", ["out/nosuch", "/abs/nosuch", "./nosuch", "../nosuch/model", "~/nosuch"])
def test_a_missing_local_model_is_named_at_once(tmp_path, monkeypatch, capsys, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    rc = main(["train", "--model", model, "--data", "d.jsonl", "--output-dir", "o"])
    err = capsys.readouterr().err
    # our own line, before any hub lookup (which would take 30-50 s of retries offline)
    assert rc == 2 and f"{model}: no such model directory" in err and "Traceback" not in err and "hub" not in err


def test_log_says_how_many_examples_a_step_really_has(tiny_model, tmp_path, capsys):
    rows, _ = review_task(n_train=8, n_eval=1, seed=4)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    assert main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "1", "--micro-batch-size", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 steps × 8 examples (all the data: --batch-size 64 is larger)" in err and "× 64 examples" not in err


def test_help_shows_each_default_once():
    from directpo.cli import make_parser

    text = make_parser("train")._subparsers._group_actions[0].choices["train"].format_help()
    assert text.count("(default: train)") == 1 and "(default: None) (default" not in text
    assert "--config CONFIG" in text and "underscores) (default: None)" not in text


def test_a_checkpoint_of_an_earlier_version_resumes(tiny_model, data, tmp_path, capsys):
    """Settings added since a checkpoint was made count as their defaults: it still resumes (and a
    really changed setting is still refused)."""
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, "--max-steps", "2", "--save-every", "1")) == 0
    state_file = out / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    for k in ("simpo_gamma", "orpo_lambda", "loss_weights", "divergence_factor"):
        state["config"].pop(k)
    state_file.write_text(json.dumps(state))
    (state_file.parent / "manifest.json").unlink()  # (earlier versions wrote no manifest)
    assert main(_argv(tiny_model, data, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert "resumed from" in capsys.readouterr().err
    assert main(_argv(tiny_model, data, out, "--max-steps", "4", "--resume", "--beta", "0.5")) == 2
    assert "beta: 0.1 -> 0.5" in capsys.readouterr().err
