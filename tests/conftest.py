"""Shared fixtures: tiny local models (tokenizer trained on the spot), real HH pairs from ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One scratch folder per test process, removed when it exits: the reference-log-prob caches (kept out
# of ~/.cache), and TMPDIR for the subprocesses (torchrun's `torchelastic_*` logs, their mkdtemp), so a
# test run leaves nothing in /tmp beside pytest's own tmp_path folders.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

SCRATCH = Path(tempfile.mkdtemp(prefix="directpo-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
(SCRATCH / "tmp").mkdir()
os.environ["TMPDIR"] = str(SCRATCH / "tmp")
os.environ.setdefault("DIRECTPO_CACHE", str(SCRATCH / "cache"))

# `--precision auto` (the default) resolves to fp32 in the tests, whatever the CPU: the exactness
# tests compare fp32 numbers, and a machine with fast bf16 would otherwise train in bf16. The tests
# of the decision itself (tests/test_precision.py) unset it.
os.environ["DIRECTPO_AUTO_PRECISION"] = "fp32"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIRECTPO_SHARED", REPO.parent / "shared"))
HH_FILE = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def hh_rows(limit: int) -> list[dict]:
    """The first `limit` raw HH-RLHF rows ({chosen, rejected} transcripts)."""
    import gzip
    import json

    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    rows = []
    with gzip.open(HH_FILE, "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random Llama with a BPE tokenizer trained on the demo task and HH text."""
    from directpo.toy import SIMPLE_CHAT_TEMPLATE, build_tiny_model, review_task

    train, _ = review_task(n_train=64, n_eval=8)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in train]
    if HH_FILE.exists():
        texts += [r["chosen"] for r in hh_rows(300)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, hidden=32, layers=2, heads=2,
                            vocab_size=600, chat_template=SIMPLE_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from directpo.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads busy-wait on a loaded machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def review_pairs(directory: Path, n_train: int = 24, seed: int = 3) -> Path:
    """A JSONL of `n_train` pairs of the built-in review task, in `directory` (d.jsonl)."""
    from directpo.toy import review_task, write_jsonl

    return write_jsonl(review_task(n_train=n_train, n_eval=1, seed=seed)[0], Path(directory) / "d.jsonl")


def train_argv(model, data, out, *extra) -> list[str]:
    """`directpo train` on a tiny model: batch 4, no warm-up, one thread, no progress bar."""
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--micro-batch-size", "4", "--max-length", "64", "--warmup-steps", "0", "--no-progress",
            "--threads", "1", *extra]


def run_process_group(cmd: list[str], env: dict, timeout: int = 300) -> tuple[int, str]:
    """(exit code, end of stderr) of `cmd` in its own session; a hang past `timeout` takes the whole
    group down (torchrun and its workers), then raises."""
    import os
    import signal
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        err = p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return p.returncode, err[-3000:]


def spread_weights(model, seed: int = 0):
    """`model` (in place, returned) with every matrix drawn from N(0, 1/fan_in): a random init of std
    0.02 gives near-uniform logits, so differences between inputs or code paths would hide."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


@pytest.fixture(autouse=True)
def share_every_repeated_prompt(monkeypatch):
    """The sampler's tests exercise both ways a prompt's repeats attend its keys (shared or copied) on
    tiny models and short prompts, where `eval.sampling.shares_keys` would copy for speed: every test
    shares whatever repeats, unless it sets `SHARED_KEYS_MIN` itself (tests/eval/test_sampling.py
    tests the rule)."""
    from directpo.eval import sampling

    monkeypatch.setattr(sampling, "SHARED_KEYS_MIN", 0)
