"""`directpo bench`: FLOP formula, bf16 gate, timing arithmetic, and an end-to-end run on a tiny model."""
from __future__ import annotations

import importlib.util
import json

import pytest

from directpo.bench import flops, report, runner
from directpo.bench.flops import ModelDims
from directpo.cli import main
from directpo.data import TokenizedExample
from directpo.toy import review_task, write_jsonl


def test_flop_formula_by_hand():
    d = ModelDims(params=0, nonemb_params=1000, hidden=4, vocab=10, layers=2, attn_dim=4)
    # prompt of 3 tokens, responses of 2 and 1 tokens
    assert flops.prefix_shared_counts(3, [2, 1]) == (6, 3, 3 * 3 / 2 + (3 * 2 + 2 * 2 / 2) + (3 * 1 + 1 / 2))
    assert flops.padded_counts(3, [2, 1]) == (9, 3, 5 * 5 / 2 + 4 * 4 / 2)
    # 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A
    assert flops.directpo_example_flops(d, 3, [2, 1]) == 6 * 1000 * 6 + 6 * 4 * 10 * 3 + 12 * 2 * 4 * 16.0
    assert flops.padded_example_flops(d, 3, [2, 1]) == 6 * 1000 * 9 + 6 * 4 * 10 * 3 + 12 * 2 * 4 * 20.5
    assert flops.directpo_example_flops(d, 3, [2, 1]) < flops.padded_example_flops(d, 3, [2, 1])


@pytest.mark.parametrize("tied", [False, True])
def test_model_dims_counts_non_embedding_params(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=16, tie_word_embeddings=tied)
    d = flops.dims_of(LlamaForCausalLM(cfg))
    per_layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8  # q k v o, gate up down, two RMSNorms
    assert d.nonemb_params == per_layer + 8  # + final norm
    assert d.params == d.nonemb_params + 100 * 8 * (1 if tied else 2)
    assert (d.hidden, d.vocab, d.layers, d.attn_dim) == (8, 100, 1, 8)


def test_bf16_gate():
    use, why = flops.bf16_decision({"fp32": 97.0, "bf16": 0.28})
    assert not use and "skipped" in why and "346×" in why
    assert flops.bf16_decision({"fp32": 50.0, "bf16": 400.0})[0]
    assert not flops.bf16_decision({"fp32": 50.0, "bf16": 0.0})[0]


def _tok(p, c, r):
    return TokenizedExample(list(range(p)), [list(range(c)), list(range(r))])


def test_directpo_rate_is_total_pairs_over_total_time():
    d = ModelDims(params=0, nonemb_params=10, hidden=2, vocab=3, layers=1, attn_dim=2)
    tokenized = [_tok(3, 2, 1), _tok(2, 1, 1), _tok(4, 2, 2), _tok(1, 1, 3), _tok(2, 2, 2), _tok(3, 1, 1)]
    members = report.step_members(6, 2, 0, 3)
    steps = []
    for k, (mb, end) in enumerate(zip(members, [1.0, 2.0, 5.0])):
        processed = sum(flops.prefix_shared_counts(len(tokenized[i].prompt_ids),
                                                   [len(x) for x in tokenized[i].response_ids])[0] for i in mb)
        steps.append({"step": k + 1, "pairs": 2, "dt": 1.0 if k < 2 else 3.0, "tokens_processed": processed,
                      "elapsed_s": end})
    s = report.summarize_directpo({"steps": steps}, tokenized, d, 2)
    assert s["pairs"] == 4 and s["seconds"] == pytest.approx(4.0)
    assert s["pairs_per_s"] == pytest.approx(1.0)  # not the mean of the step rates, (2 + 2/3) / 2
    assert s["tokens_exact"]
    timed = [i for mb in members[1:] for i in mb]
    assert s["tokens"] == sum(tokenized[i].num_tokens for i in timed)
    # When the logged tokens do not match the reproduced order, fall back to per-pair means.
    steps[1]["tokens_processed"] += 7
    assert not report.summarize_directpo({"steps": steps}, tokenized, d, 2)["tokens_exact"]


def test_trl_summary_counts_from_its_inputs():
    d = ModelDims(params=0, nonemb_params=10, hidden=2, vocab=3, layers=1, attn_dim=2)
    step = {"rows": 4, "tokens": 20, "labels": 8, "sq_len": 100.0}
    raw = {"step_end_times": [10.0, 12.0, 14.0], "step_inputs": [step, step, step]}
    s = report.summarize_trl(raw, d, live_ref=False)
    assert s["pairs_per_s"] == pytest.approx(1.0) and s["tokens_per_s"] == pytest.approx(10.0)
    assert s["flops"] == pytest.approx(2 * flops.train_flops(d, 20, 8, 50.0))
    assert report.summarize_trl(raw, d, live_ref=True)["flops"] == pytest.approx(s["flops"] * 4 / 3)


def test_parse_flags():
    assert runner.parse_systems("directpo, trl") == ["directpo", "trl"]
    assert runner.parse_systems("none") == []
    with pytest.raises(ValueError):
        runner.parse_systems("directpo,deepspeed")
    assert runner.parse_vocab_sweep("8192,32768") == [8192, 32768]
    with pytest.raises(ValueError):
        runner.parse_vocab_sweep("8k")


def test_too_few_pairs_is_a_clear_error(tiny_model, tmp_path, capsys):
    train, _ = review_task(n_train=5, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    rc = main(["bench", "--model", str(tiny_model), "--data", str(data), "--systems", "directpo", "--batch", "4",
               "--steps", "2", "--threads", "1"])
    assert rc == 2
    assert "batch × (steps + 1) = 12" in capsys.readouterr().err


def test_bench_directpo_end_to_end(tiny_model, tmp_path, capsys):
    train, _ = review_task(n_train=16, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_model), "--data", str(data), "--systems", "directpo", "--batch", "4",
               "--steps", "2", "--rounds", "1", "--threads", "1", "--max-length", "128", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pairs/s" in printed and "peak RSS MiB" in printed
    r = json.loads(out.read_text())
    assert r["settings"]["pairs"] == 12 and r["settings"]["steps_timed"] == 2
    assert r["matmul_peak_gflops"]["fp32"] > 0
    assert isinstance(r["bf16"]["used"], bool) and r["bf16"]["reason"]
    assert {"tokens", "flops", "pairs_per_s"} <= set(r["definitions"])
    (res,) = [x for x in r["results"] if x["config"] == "fp32"]
    assert res["system"] == "directpo" and res["rounds_ok"] == 1
    assert res["pairs_per_s"] > 0 and res["tokens_per_s"] > 0 and res["peak_rss_mib"] > 0
    (run,) = [x for x in r["runs"] if x["config"] == "fp32"]
    assert run["tokens_exact"] and run["pairs"] == 8 and run["train_pairs"] == 12
    # Whatever the machine's load: the tokens and FLOPs are those of exactly the pairs of the timed
    # steps 2 and 3 (the loop's seeded order over the same 12 pairs), and every rate is one of those
    # counts over the same measured time.
    dims = flops.model_dims(str(tiny_model))
    assert r["model"] == {"params": dims.params, "nonemb_params": dims.nonemb_params, "hidden": dims.hidden,
                          "vocab": dims.vocab, "layers": dims.layers, "attn_dim": dims.attn_dim}
    tokenized, _ = runner.prepare_pairs(str(data), str(tiny_model), 12, 128, tmp_path / "again.jsonl")
    timed = [i for mb in report.step_members(12, 4, 0, 3)[1:] for i in mb]
    assert len(timed) == 8
    assert run["tokens"] == sum(tokenized[i].num_tokens for i in timed)
    assert run["flops"] == pytest.approx(sum(
        flops.directpo_example_flops(dims, len(tokenized[i].prompt_ids), [len(x) for x in tokenized[i].response_ids])
        for i in timed))
    assert run["pairs_per_s"] == pytest.approx(run["pairs"] / run["seconds"])
    assert run["gflops"] == pytest.approx(run["flops"] / run["seconds"] / 1e9)
    assert res["gflops"] == pytest.approx(run["gflops"]) and res["gflops"] > 0
    assert res["flops_per_pair"] == pytest.approx(run["flops"] / 8)
    assert res["pct_of_peak"] == pytest.approx(100 * res["gflops"] / r["matmul_peak_gflops"]["fp32"])
    assert r["comparison"] is None  # no TRL run
    assert r["vocab_sweep"] == []


@pytest.mark.slow
def test_vocab_sweep(tiny_model, tmp_path):
    train, _ = review_task(n_train=16, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model), "--data", str(data), "--systems", "none", "--batch", "4",
                 "--steps", "2", "--threads", "1", "--max-length", "128", "--out", str(out),
                 "--vocab-sweep", "600,1200,10"]) == 0
    r = json.loads(out.read_text())
    assert r["results"] == [] and r["runs"] == []
    sweep = r["vocab_sweep"]
    assert "error" in sweep[2]  # smaller than the tokenizer
    sweep = sweep[:2]
    assert [x["vocab"] for x in sweep] == [600, 1200]
    assert all(x["peak_rss_mib"] > 0 for x in sweep)
    assert sweep[1]["params"] > sweep[0]["params"] and "sublinear" in sweep[1]


@pytest.mark.slow
@pytest.mark.trl
def test_bench_against_trl(tiny_model, tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL not installed")
    train, _ = review_task(n_train=16, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model), "--data", str(data), "--batch", "4", "--steps", "2",
                 "--rounds", "1", "--threads", "1", "--max-length", "128", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    configs = {(x["system"], x["config"]) for x in r["results"] if x["pairs_per_s"]}
    assert {("directpo", "fp32"), ("trl", "fp32 (live ref)"), ("trl", "precompute_ref fp32")} <= configs
    trl = [x for x in r["runs"] if x["system"] == "trl"]
    assert all(x["train_pairs"] == 12 and x["pairs"] == 8 for x in trl)
    # Same pairs, same padded-equivalent token definition: per-pair tokens agree across systems
    # (up to which 4 pairs each system's shuffle put in its untimed warm-up step).
    per_pair = [x["tokens"] / x["pairs"] for x in r["runs"]]
    assert max(per_pair) / min(per_pair) < 1.2
    assert r["comparison"]["pairs_per_s"]["ratio"] > 0
