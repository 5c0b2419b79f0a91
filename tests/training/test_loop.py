"""The trainer: metrics, saving, reproducibility, accumulation, reference modes, schedule."""
import json
import math

import pytest
import torch

from directpo.toy import review_task, write_jsonl
from directpo.training import TrainConfig, train
from directpo.training.loop import batch_order

REQUIRED = ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_s"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    tr, ev = review_task(n_train=48, n_eval=16, seed=3)
    return write_jsonl(tr, d / "train.jsonl"), write_jsonl(ev, d / "eval.jsonl")


def _cfg(tiny_model, task, out, **kw):
    base = dict(model=str(tiny_model), data=str(task[0]), output_dir=str(out), lr=1e-3, optimizer="adamw",
                batch_size=8, micro_batch_size=4, max_steps=4, warmup_steps=2, progress=False, max_length=64)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_metrics_eval_and_saved_model(tiny_model, task, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model, task, out, eval_data=str(task[1]), eval_every=2))
    lines = _metrics(out)
    tr = [m for m in lines if m["split"] == "train"]
    ev = [m for m in lines if m["split"] == "eval"]
    assert [m["step"] for m in tr] == [1, 2, 3, 4]
    assert [m["step"] for m in ev] == [0, 2, 4]
    for m in tr:
        for k in REQUIRED:
            assert k in m and math.isfinite(m[k]), k
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
    assert ev[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    # warm-up: lr·min(1, step/warmup)
    assert [m["lr"] for m in tr] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert (out / "model.safetensors").exists()
    diffs = [(a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters())]
    assert max(diffs) > 0  # it trained
    cfg = json.loads((out / "directpo_config.json").read_text())
    assert cfg["reference"] == str(tiny_model) and cfg["reference_mode"] == "precomputed" and cfg["beta"] == 0.1


def test_reproducible_and_refuses_to_overwrite(tiny_model, task, tmp_path):
    train(_cfg(tiny_model, task, tmp_path / "a"))
    train(_cfg(tiny_model, task, tmp_path / "b"))
    la, lb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(_cfg(tiny_model, task, tmp_path / "a"))
    train(_cfg(tiny_model, task, tmp_path / "a", overwrite=True))


def test_accumulation_and_precomputed_reference_match(tiny_model, task, tmp_path):
    """Same global batch: micro-batch 8, 4 or 2, live or precomputed reference, packed or padded
    layout -> the same trajectory."""
    runs = {}
    for name, kw in {"mb8": dict(micro_batch_size=8, precompute_ref=False),
                     "mb2": dict(micro_batch_size=2, precompute_ref=False),
                     "pre": dict(micro_batch_size=4, precompute_ref=True),
                     "padded": dict(micro_batch_size=4, layout="padded"),
                     "tokens": dict(micro_batch_tokens=120, precompute_ref=False)}.items():
        train(_cfg(tiny_model, task, tmp_path / name, optimizer="rmsprop", lr=1e-4, **kw))
        runs[name] = _metrics(tmp_path / name)
    for name in ("mb2", "pre", "padded", "tokens"):
        for a, b in zip(runs["mb8"], runs[name]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), name


def test_batch_order_is_a_seeded_permutation_per_epoch():
    it = batch_order(10, 4, seed=7)
    epoch0 = [next(it) for _ in range(3)]
    assert [e for e, _ in epoch0] == [0, 0, 0]
    seen = sum((idx for _, idx in epoch0), [])
    assert sorted(seen) == list(range(10))  # every example once per epoch, last batch partial
    assert next(it)[0] == 1
    again = batch_order(10, 4, seed=7)
    assert [next(again)[1] for _ in range(3)] == [idx for _, idx in epoch0]
    other = batch_order(10, 4, seed=8)
    assert [next(other)[1] for _ in range(3)] != [idx for _, idx in epoch0]


def test_config_validation():
    with pytest.raises(ValueError, match="--model"):
        TrainConfig(data="x", output_dir="o").validate()
    with pytest.raises(ValueError, match="multiple of --micro-batch-size"):
        TrainConfig(model="m", data="d", output_dir="o", batch_size=10, micro_batch_size=4).validate()
    cfg = TrainConfig(model="m", data="d", output_dir="o").validate()
    assert (cfg.beta, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.warmup_steps) == (0.1, 64, "rmsprop", 1e-6, 150)


def test_bf16_autocast_trains_close_to_fp32(tiny_model, task, tmp_path):
    train(_cfg(tiny_model, task, tmp_path / "fp32", max_steps=2))
    train(_cfg(tiny_model, task, tmp_path / "bf16", max_steps=2, precision="bf16"))
    a, b = _metrics(tmp_path / "fp32"), _metrics(tmp_path / "bf16")
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert b[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(a[0]["logps/chosen"] - b[0]["logps/chosen"]) < 0.05 * abs(a[0]["logps/chosen"])
    assert torch.isfinite(torch.tensor(b[-1]["loss"]))


def test_token_budget_micro_batches():
    from types import SimpleNamespace

    from directpo.training.loop import micro_batches

    exs = [SimpleNamespace(num_tokens=n) for n in (10, 20, 30, 40, 100)]
    cfg = SimpleNamespace(micro_batch_tokens=50, micro_batch_size=8)
    assert micro_batches([0, 1, 2, 3, 4], exs, cfg) == [[0, 1], [2], [3], [4]]  # an oversized example goes alone
    cfg.micro_batch_tokens = 100  # the budget is inclusive: 10+20+30+40 = 100 fits in one
    assert micro_batches([0, 1, 2, 3, 4], exs, cfg) == [[0, 1, 2, 3], [4]]
    cfg.micro_batch_tokens, cfg.micro_batch_size = 0, 2  # off: split by count
    assert micro_batches([0, 1, 2, 3, 4], exs, cfg) == [[0, 1], [2, 3], [4]]


def test_precomputed_reference_on_rankings_of_mixed_lengths(tiny_model, tmp_path):
    """Rankings of 3 and of 2 responses in one micro-batch: the precomputed table (as wide as the
    longest ranking) gives the live reference's trajectory, in training and in evaluation."""
    from directpo.toy import ranked_review_task

    tr, ev, _ = ranked_review_task(n_train=16, n_eval=8, k=3, seed=2)
    for rows in (tr, ev):
        for r in rows[::2]:  # every other ranking loses its last response
            r["responses"], r["scores"] = r["responses"][:2], r["scores"][:2]
    data = (write_jsonl(tr, tmp_path / "train.jsonl"), write_jsonl(ev, tmp_path / "eval.jsonl"))
    runs = {}
    for name, pre in (("live", False), ("pre", True)):
        train(_cfg(tiny_model, data, tmp_path / name, loss="plackett_luce", optimizer="rmsprop", lr=1e-4,
                   precompute_ref=pre, eval_data=str(data[1]), eval_every=2))
        runs[name] = _metrics(tmp_path / name)
    assert len(runs["pre"]) == len(runs["live"]) == 4 + 3  # 4 train steps, evals at 0, 2, 4
    for a, b in zip(runs["live"], runs["pre"]):
        assert (a["split"], a["step"]) == (b["split"], b["step"])
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/kendall_tau"] == pytest.approx(a["rewards/kendall_tau"], abs=1e-5)
