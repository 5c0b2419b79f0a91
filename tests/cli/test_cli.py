"""The `directpo` command line: flags, YAML config, score, train on real HH pairs, errors."""
import json
import math

import pytest

from directpo.cli import main, make_parser
from directpo.config import ConfigError, build_config
from directpo.training.config import TrainConfig
from directpo.toy import review_task, write_jsonl

from conftest import hh_rows


def test_flags_yaml_and_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m\ndata: d\noutput-dir: o\nbeta: 0.5\nmax_steps: 7\nprecompute_ref: true\n")
    args = make_parser("train").parse_args(["train", "--config", str(cfg_file), "--beta", "0.25", "--max-length",
                                            "none"])
    cfg = build_config(args, TrainConfig)
    assert (cfg.model, cfg.output_dir, cfg.beta, cfg.max_steps, cfg.precompute_ref) == ("m", "o", 0.25, 7, True)
    assert cfg.max_length is None and cfg.lr == 1e-6  # flag overrides YAML; untouched keys keep defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("betta: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'betta'"):
        build_config(make_parser("train").parse_args(["train", "--config", str(bad)]), TrainConfig)


def test_all_issue_flags_exist():
    """The flag names scripts depend on (fixed by the DPO-core issue)."""
    args = make_parser("train").parse_args(
        ["train", "--model", "M", "--data", "D", "--output-dir", "O", "--ref", "R", "--beta", "0.2", "--lr", "1e-5",
         "--optimizer", "adamw", "--batch-size", "16", "--micro-batch-size", "4", "--max-steps", "3", "--epochs", "2",
         "--warmup-steps", "5", "--max-length", "128", "--max-prompt-length", "64", "--eval-data", "E",
         "--eval-every", "10", "--seed", "3", "--precompute-ref", "--on-invalid", "skip"])
    cfg = build_config(args, TrainConfig)
    assert (cfg.ref, cfg.micro_batch_size, cfg.epochs, cfg.max_prompt_length, cfg.on_invalid) == ("R", 4, 2.0, 64,
                                                                                                   "skip")
    args = make_parser("score").parse_args(["score", "--model", "M", "--data", "D", "--out", "F.jsonl", "--ref", "R",
                                     "--beta", "0.3", "--max-length", "100"])
    assert (args.ref, args.beta, args.max_length) == ("R", 0.3, 100)


def test_score_in_input_order(tiny_model, tmp_path, capsys):
    rows, _ = review_task(n_train=10, n_eval=1, seed=5)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", str(tiny_model), "--data", str(data), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in open(out)]
    assert [x["row"] for x in lines] == list(range(10))
    assert all(x["chosen_logp"] < 0 and x["rejected_logp"] < 0 for x in lines)
    assert "chosen_reward" not in lines[0]
    # with --ref = the same model every implicit reward is exactly 0
    out2 = tmp_path / "s2.jsonl"
    assert main(["score", "--model", str(tiny_model), "--data", str(data), "--out", str(out2), "--ref",
                 str(tiny_model), "--beta", "0.5"]) == 0
    lines2 = [json.loads(line) for line in open(out2)]
    assert all(x["chosen_reward"] == 0 and x["rejected_reward"] == 0 for x in lines2)
    assert [x["chosen_logp"] for x in lines2] == [x["chosen_logp"] for x in lines]
    assert "implicit-reward accuracy" in capsys.readouterr().err


def test_bad_data_exits_with_file_row_field(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a", "rejected": 3}) + "\n")
    rc = main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(data) in err and "line 2" in err and "'rejected'" in err


def test_train_on_real_hh_pairs_reaches_high_reward_accuracy(tiny_model, tmp_path):
    """The issue's check: --lr 1e-4 --optimizer adamw, 64 HH pairs, 40 steps -> train accuracy > 0.9."""
    data = write_jsonl(hh_rows(80), tmp_path / "hh.jsonl")  # raw transcripts: the HH split is exercised
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-4",
               "--optimizer", "adamw", "--batch-size", "64", "--micro-batch-size", "16", "--max-steps", "40",
               "--warmup-steps", "0", "--max-length", "160", "--max-prompt-length", "112", "--on-invalid", "skip",
               "--precompute-ref",
               "--no-progress"])
    assert rc == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(lines) == 40 and lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert lines[-1]["rewards/accuracies"] > 0.9
    assert lines[-1]["loss"] < lines[0]["loss"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_real_hh_trains_with_the_default_lengths(tiny_model, tmp_path, capsys):
    """No length flags: the multi-turn prompts longer than the default --max-length 512 are cut (to
    half of it, latest turns kept) instead of stopping the run, and the log counts them."""
    rows = hh_rows(300)
    data = write_jsonl(rows, tmp_path / "hh.jsonl")
    rc = main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
               "--max-steps", "1", "--batch-size", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    import re

    cut = int(re.search(r"(\d+) cut to half of max_length to fit", err).group(1))
    assert cut > 0
    done = json.loads((tmp_path / "o" / "directpo_config.json").read_text())
    assert done["train_examples"] == len(rows) and done["max_prompt_length"] is None


def test_a_torchrun_worker_ends_without_the_interpreters_teardown(monkeypatch, tmp_path, capsys):
    """Under torchrun a worker ends with os._exit and the command's exit status, after flushing: the
    interpreter's teardown could race Gloo's threads releasing the last collective (std::terminate,
    exit -6 after a complete run). A usage error and a user error keep their statuses."""
    import os

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ended = []
    monkeypatch.setattr(os, "_exit", ended.append)
    main(["inspect", "--help"])
    main(["inspect", "--data", str(tmp_path / "missing.jsonl")])
    main(["inspect", "--no-such-flag"])
    assert ended == [0, 2, 2]
    err = capsys.readouterr().err
    assert "directpo inspect: error: give --model" in err and "unrecognized arguments: --no-such-flag" in err
    monkeypatch.delenv("LOCAL_RANK")  # not a torchrun worker: main returns as always
    assert main(["inspect", "--data", str(tmp_path / "missing.jsonl")]) == 2 and ended == [0, 2, 2]


@pytest.mark.parametrize("how", ["flag", "config"])
def test_sft_refuses_another_loss(tmp_path, capsys, how):
    """`directpo sft --loss dpo` (or a --config shared with `train` holding `loss: dpo`) trained DPO under
    the name sft; now refused in one line, before anything loads."""
    argv = ["sft", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output-dir",
            str(tmp_path / "out")]
    if how == "flag":
        argv += ["--loss", "dpo"]
    else:
        (tmp_path / "c.yaml").write_text("loss: dpo\nbeta: 0.1\n")
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "directpo sft: error: " in err[0] and "'dpo'" in err[0], err
    assert "directpo train" in err[0] and not (tmp_path / "out").exists()


def test_sft_help_says_the_loss_it_trains(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--loss LOSS sft (the only loss this command trains" in text and "(default: dpo)" not in text


def test_a_command_makes_full_collections_rarer_and_leaves_young_ones_alone():
    """The command line (not the library) lets a full GC wait for 100 middle-generation collections:
    a command's setup leaves ~10^6 long-lived objects that each full collection would rescan."""
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with pytest.raises(SystemExit):
            main(["--version"])
        assert gc.get_threshold() == (700, 10, 100)
        gc.set_threshold(500, 7, 1000)  # a larger full threshold set by the user stands
        with pytest.raises(SystemExit):
            main(["--version"])
        assert gc.get_threshold() == (500, 7, 1000)
    finally:
        gc.set_threshold(*before)
