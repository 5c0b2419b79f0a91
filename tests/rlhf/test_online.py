"""`directpo online`: rounds of sample → score → pair → DPO → evaluate on the tiny model, resumable."""
from __future__ import annotations

import json
import os

import pytest

from directpo.cli import main
from directpo.rlhf.online import build_pairs

REWARD = "directpo.eval.scorers:review_sentiment"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_build_pairs_best_worst_all_and_ties():
    texts = ["a", "b", "c", "d", "e", "f"]
    rows, empty = build_pairs(["p", "q"], texts, [1.0, 3.0, 2.0, 0.0, 0.0, 0.0], 3)
    assert empty == 1 and [(r["chosen"], r["rejected"]) for r in rows] == [("b", "a")]
    rows, empty = build_pairs(["p", "q"], texts, [1.0, 3.0, 2.0, 0.0, 0.0, 0.0], 3, "all", margin=0.5)
    assert empty == 1 and sorted((r["chosen"], r["rejected"]) for r in rows) == [("b", "a"), ("b", "c"), ("c", "a")]
    assert all(r["chosen_reward"] > r["rejected_reward"] + 0.5 for r in rows)
    assert build_pairs(["p"], ["x", "x"], [2.0, 1.0], 2)[0] == []  # identical texts never pair


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from directpo.data.formats import write_jsonl
    from directpo.toy import review_task

    train, _ = review_task(n_train=16, n_eval=4, seed=3)
    return write_jsonl([{"prompt": r["prompt"]} for r in train], tmp_path_factory.mktemp("online") / "prompts.jsonl")


@pytest.fixture(scope="module")
def sft_model(tiny_model, tmp_path_factory):
    """πSFT: the tiny random model fine-tuned briefly on reviews that mix praise and criticism, so its
    samples' rewards vary (the random model's are all 0)."""
    from directpo.data.formats import write_jsonl
    from directpo.toy import review_task
    from directpo.training.config import TrainConfig
    from directpo.training.loop import train

    rows, _ = review_task(n_train=64, n_eval=4, seed=5)
    tmp = tmp_path_factory.mktemp("online-sft")
    data = write_jsonl([{"prompt": r["prompt"], "completion": r[k]} for r in rows for k in ("chosen", "rejected")],
                       tmp / "sft.jsonl")
    train(TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(tmp / "sft"), loss="sft", lr=1e-2,
                      optimizer="adamw", batch_size=32, micro_batch_size=32, max_steps=30, warmup_steps=0,
                      max_length=64, device="cpu", threads=1, progress=False, log_every=10 ** 9))
    return tmp / "sft"


def online(model, prompts, out, *extra):
    return main(["online", "--model", str(model), "--prompts", str(prompts), "--reward-fn", REWARD,
                 "--output-dir", str(out), "--samples-per-prompt", "4", "--lr", "1e-3", "--optimizer", "adamw",
                 "--batch-size", "16", "--micro-batch-size", "16", "--epochs-per-round", "4", "--beta", "0.1",
                 "--max-new-tokens", "8", "--eval-samples", "4", "--max-length", "64", "--device", "cpu",
                 "--threads", "1", "--no-progress", *extra])


REWRITTEN = ("rounds.jsonl", "online.png", "online_config.json")  # rewritten by every invocation


def mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_online_rounds_learn_and_resume(sft_model, prompts, tmp_path, capsys):
    out = tmp_path / "online"
    assert online(sft_model, prompts, out, "--rounds", "1") == 0  # a run stopped after round 1 ...
    assert [r["round"] for r in read_jsonl(out / "rounds.jsonl")] == [0, 1]
    first = mtimes(out)
    assert online(sft_model, prompts, out, "--rounds", "2") == 0  # ... continues with round 2
    lines = read_jsonl(out / "rounds.jsonl")
    print(json.dumps(lines, indent=1))
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert (out / "online.png").stat().st_size > 0
    again = mtimes(out)
    redone = [p for p in first if p.name not in REWRITTEN and again[p] != first[p]]
    assert not redone, redone  # round 0 and round 1 were not recomputed
    # mechanics: pairs ordered by reward, the policy moved away from πSFT
    for r in (1, 2):
        pairs = read_jsonl(out / f"round-{r}" / "pairs.jsonl")
        assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
        assert lines[r]["pairs"] == len(pairs)
        assert (out / f"round-{r}" / "policy" / "run_complete.json").exists()
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert lines[1]["kl"] > 0 and lines[2]["kl"] > 0
    assert lines[2]["reward"] > lines[0]["reward"]
    capsys.readouterr()

    # a rerun of the finished run recomputes nothing
    assert online(sft_model, prompts, out, "--rounds", "2") == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    final = mtimes(out)
    assert not [p for p in again if p.name not in REWRITTEN and final[p] != again[p]]

    # a kill in round 2 after training, before its evaluation was recorded: only the evaluation reruns
    (out / "round-2" / "eval.done.json").unlink()
    assert online(sft_model, prompts, out, "--rounds", "2") == 0
    after = mtimes(out)
    assert after[out / "round-2" / "pairs.jsonl"] == final[out / "round-2" / "pairs.jsonl"]
    assert after[out / "round-2" / "eval.done.json"] != final.get(out / "round-2" / "eval.done.json")
    assert read_jsonl(out / "rounds.jsonl")[2]["reward"] == pytest.approx(lines[2]["reward"])  # same seed


def test_online_refuses_other_settings(sft_model, prompts, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "online_config.json").write_text(json.dumps({"model": "elsewhere", "lr": 1.0}))
    assert online(sft_model, prompts, out, "--rounds", "1") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--model" in err and "--overwrite" in err
    assert not (out / "round-0").exists()
    assert main(["online", "--model", str(sft_model), "--prompts", str(prompts), "--output-dir", str(out)]) == 2
    assert "exactly one of --reward-fn" in capsys.readouterr().err


def test_a_round_without_pairs_stops_with_a_hint(tiny_model, prompts, tmp_path, capsys):
    """The random tiny model's samples all score 0 under the review reward: no pairs, one line saying
    what to raise, exit 2 (not a DPO run on an empty file)."""
    rc = online(tiny_model, prompts, tmp_path / "o", "--rounds", "1")
    err = capsys.readouterr().err
    assert rc == 2 and "round 1: no pairs" in err and "--samples-per-prompt" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "round-1" / "policy").exists()


def test_online_with_fixed_length_samples_and_evaluates_full_length(sft_model, prompts, tmp_path):
    """--fixed-length: every round's samples (those paired and trained on, and the evaluation's) are
    exactly --max-new-tokens long, and round 0's KL(π'‖πSFT') is 0."""
    out = tmp_path / "online"
    assert online(sft_model, prompts, out, "--rounds", "1", "--fixed-length") == 0
    lines = read_jsonl(out / "rounds.jsonl")
    assert [r["length"] for r in lines] == [8.0, 8.0] and lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((out / "online_config.json").read_text())["fixed_length"] is True
