"""`--memory-budget` of `sample`, `bon` and `eval`: the sampling batch chosen for a budget grows with
it and shrinks with max_new_tokens, a real run at that batch stays under it (its tensors counted as
they live), a budget too small for one row is a one-line error, the choice is logged and recorded,
and an explicit --batch-size wins."""
import dataclasses
import json

import pytest
import torch

from directpo.cli import main
from directpo.config import ConfigError, build_config
from directpo.eval.budget import MiB, SamplingBudgetError, live_bytes, parse_size
from directpo.eval.config import EvalConfig, SampleConfig
from directpo.eval.sampling import generate_completions, measure_costs, plan_batch
from directpo.models import load_model
from directpo.toy import review_task, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(str(tiny_model), "cpu").eval()


@pytest.fixture(scope="module")
def deep_model(tiny_tokenizer):
    """12 layers of the tiny model's width: the KV cache (all layers) outweighs a forward's
    activations (one layer at a time), as in real models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=tiny_tokenizer.pad_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def _prompts(tokenizer, n_prompts: int, k: int, seed: int = 0, lengths=(40, 121)) -> list[list[int]]:
    """n_prompts random prompts of 40 to 120 tokens, each k times."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) - 8  # not the special tokens at the end
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(*lengths, (n_prompts,), generator=gen)]
    return [p for p in prompts for _ in range(k)]


def test_size_grammar_is_trainings():
    """One grammar for every memory setting: `directpo.config.parse_size`, read by both layers."""
    from directpo.memory import parse_size as the_one
    from directpo.training.plan import parse_size as training_parse_size

    assert parse_size is the_one is training_parse_size
    for bad in ["", "8 parsecs", "-1GiB", "0"]:
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)


def test_batch_grows_with_the_budget_and_shrinks_with_max_new_tokens(model, tiny_tokenizer):
    ids, pad = _prompts(tiny_tokenizer, 64, 1), tiny_tokenizer.pad_token_id
    costs = measure_costs(model, ids, 32, 1.0, pad)
    chosen = [plan_batch(model, ids, 32, 1.0, pad, costs.held + mib * MiB, costs)["batch_size"]
              for mib in (1, 2, 4, 8)]
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1] < len(ids)
    # the same budget, longer completions: a bigger cache per row, fewer rows (the process's memory
    # held fixed at the first measurement, so only max_new_tokens differs)
    longer = dataclasses.replace(measure_costs(model, ids, 128, 1.0, pad), held=costs.held)
    assert plan_batch(model, ids, 128, 1.0, pad, costs.held + 4 * MiB, longer)["batch_size"] < chosen[2]


@pytest.mark.parametrize("k,top_p,chunk", [(1, 1.0, None), (4, 0.9, None), (1, 1.0, 8)])
def test_a_real_run_at_the_chosen_batch_stays_under_the_budget(deep_model, tiny_tokenizer, k, top_p, chunk,
                                                               monkeypatch):
    """The tensors a real sampling run makes, counted while they live, peak under what the plan gives
    them (the budget less what the process held); and the plan is not loose by much. `chunk`: the
    prompts prefilled in chunks of 8 columns (the probe measures that prefill too)."""
    from directpo.eval import sampling

    if chunk is not None:
        monkeypatch.setattr(sampling, "PREFILL_CHUNK", chunk)
    ids, pad = _prompts(tiny_tokenizer, 16 // k, k, seed=k, lengths=(10, 41)), tiny_tokenizer.pad_token_id
    costs = measure_costs(deep_model, ids, 32, top_p, pad)
    budget = costs.held + 2 * MiB
    plan = plan_batch(deep_model, ids, 32, top_p, pad, budget, costs)
    assert 1 < plan["batch_size"] < len(ids) and plan["total"] <= budget
    assert plan["cache"] > plan["forward"] and plan["cache"] > plan["sampling"]  # a cache-bound run
    with live_bytes() as live:
        generate_completions(deep_model, tiny_tokenizer, ids, 32, 1.0, top_p, seed=0, batch_size=plan["batch_size"])
    allowed = plan["total"] - costs.held
    assert live.peak <= allowed
    assert live.peak >= 0.6 * allowed, (live.peak, plan)
    # one row more would not have fitted, by the same arithmetic: the largest batch that fits
    over = plan_batch(deep_model, ids, 32, top_p, pad, plan["total"] - 1, costs)
    assert over["batch_size"] < plan["batch_size"]


def test_budget_too_small_for_one_row_is_one_line_naming_the_minimum(tiny_model, tmp_path, capsys):
    prompts = write_jsonl([{"prompt": "Review of Kalo:"}], tmp_path / "p.jsonl")
    args = ["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
            "--max-new-tokens", "4", "--no-progress", "--memory-budget", "1MiB"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--memory-budget 1 MiB: too small" in err and "needs at least" in err
    from directpo.eval.sample import sample

    with pytest.raises(SamplingBudgetError, match="needs at least"):
        sample(str(tiny_model), str(prompts), str(tmp_path / "o2.jsonl"), max_new_tokens=4, progress=False,
               memory_budget="1MiB")


@pytest.mark.parametrize("command", ["sample", "bon", "eval"])
def test_flag_in_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--memory-budget MEMORY_BUDGET" in out and "the sampling batch is chosen from the budget" in out


def test_settings_budget_checked_and_passed_on(tmp_path):
    cfg = SampleConfig(model="m", prompts="p", out="o", memory_budget="2GiB").validate()
    assert cfg.sampling()["memory_budget"] == "2GiB" and cfg.sampling()["batch_size"] == 16
    (tmp_path / "c.yaml").write_text("batch_size: 4\nmemory_budget: 1GiB\n")
    import argparse

    yaml_cfg = build_config(argparse.Namespace(config=str(tmp_path / "c.yaml")), EvalConfig)
    assert yaml_cfg.memory_budget == "1GiB" and yaml_cfg.sampling()["batch_size"] == 4
    with pytest.raises(ConfigError, match="--memory-budget 'lots': not a size"):
        SampleConfig(model="m", prompts="p", out="o", memory_budget="lots").validate()


def _run(argv, capsys, errors: list | None = None) -> dict:
    assert main(argv) == 0
    captured = capsys.readouterr()
    if errors is not None:  # the command's log lines (stderr)
        errors.append(captured.err)
    return json.loads(captured.out.strip().splitlines()[-1])


def test_chosen_batch_logged_recorded_and_reproduced(tiny_model, tmp_path, capsys):
    rows = [{"prompt": f"Review of {name}:"} for name in ("Kalo", "Mirento", "Sa", "Tovu", "Brel")]
    prompts = write_jsonl(rows, tmp_path / "p.jsonl")
    base = ["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "6",
            "--no-progress", "--seed", "4"]
    logged: list[str] = []  # (read from stderr: caplog sees only what propagates to the root logger, which
    # the directpo logger does not once its own handler is set up, so caplog passed or failed by test order)
    chosen = _run(base + ["--out", str(tmp_path / "a.jsonl"), "--memory-budget", "64GiB"], capsys, logged)
    assert chosen["sampling_batch_size"] == 15  # all the samples fit at once
    assert "sampling batch 15 rows for 64.00 GiB" in logged[0]
    again = _run(base + ["--out", str(tmp_path / "b.jsonl"), "--batch-size", "15"], capsys)
    assert again["sampling_batch_size"] == 15
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_bon_and_eval_record_the_chosen_batch(tiny_model, tmp_path, capsys):
    from directpo.api import best_of_n, evaluate

    rows, _ = review_task(n_train=4, n_eval=1, seed=2)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    common = dict(model=str(tiny_model), prompts=str(data), n=2, max_new_tokens=4, progress=False,
                  reward_fn="directpo.eval.scorers:review_sentiment", memory_budget="64GiB")
    assert best_of_n(out=str(tmp_path / "bon.jsonl"), **common)["sampling_batch_size"] == 8
    res = evaluate(out=str(tmp_path / "eval.json"), ref=str(tiny_model), **common)
    assert res["sampling_batch_size"] == 8
    assert json.loads((tmp_path / "eval.json").read_text())["sampling_batch_size"] == 8
