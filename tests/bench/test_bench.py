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
    # LoRA: frozen weights take no gradient, 4·N·T + 4·h·V·Lab; a live reference adds 2 of 4 passes
    lora = ModelDims(params=0, nonemb_params=1000, hidden=4, vocab=10, layers=2, attn_dim=4, frozen=True)
    assert flops.directpo_example_flops(lora, 3, [2, 1]) == 4 * 1000 * 6 + 4 * 4 * 10 * 3 + 12 * 2 * 4 * 16.0
    assert (flops.live_reference_factor(d), flops.live_reference_factor(lora)) == (4 / 3, 1.5)


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
    # with accumulation, TRL records each micro-batch: they are summed per optimizer step
    half = {"rows": 2, "tokens": 10, "labels": 4, "sq_len": 50.0}
    acc = report.summarize_trl({**raw, "step_inputs": [half] * 6, "grad_accum": 2}, d, live_ref=False)
    assert (acc["pairs"], acc["tokens"], acc["flops"]) == (s["pairs"], s["tokens"], s["flops"])


def test_same_optimizer_and_micro_batch_on_both_sides():
    """TRL is given directpo's RMSprop (every hyper-parameter, constant lr, its clipping) and the
    same micro-batch unless --trl-micro-batch says otherwise; a batch TRL cannot split is refused."""
    from types import SimpleNamespace

    from directpo.bench.fairness import rmsprop_settings
    from directpo.bench.trl import same_optimizer
    from directpo.training.config import TrainConfig

    kw = same_optimizer({"optimizer": "rmsprop"})
    assert kw["optim"] == "rmsprop" and kw["lr_scheduler_type"] == "constant" and kw["warmup_steps"] == 0
    assert kw["max_grad_norm"] == TrainConfig.__dataclass_fields__["max_grad_norm"].default
    given = dict(x.split("=") for x in kw["optim_args"].split(","))
    r = rmsprop_settings(1e-6)
    assert {k: float(given[k]) for k in ("alpha", "eps", "momentum", "weight_decay")} == \
        {k: float(r[k]) for k in ("alpha", "eps", "momentum", "weight_decay")}
    args = SimpleNamespace(batch=8, micro_batch=0, trl_micro_batch=0, steps=1, rounds=1, lora_r=0,
                           systems="directpo,trl", vocab_sweep=None)
    assert runner.trl_micro_batch(args) == 8
    args.micro_batch = 4
    assert runner.trl_micro_batch(args) == 4
    args.trl_micro_batch = 3
    with pytest.raises(ValueError, match="not a multiple of TRL's micro-batch 3"):
        runner._check_args(args)


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
    rc = main(["bench", "--model", str(tiny_model), "--data", str(data), "--lora-r", "-4"])
    assert rc == 2
    assert "--lora-r -4: the LoRA rank must be ≥ 0" in capsys.readouterr().err


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
    # memory above the import baseline (RSS once torch and transformers are imported, before the model)
    assert 0 < res["import_rss_mib"] < res["peak_rss_mib"]
    assert res["peak_above_import_mib"] == pytest.approx(res["peak_rss_mib"] - res["import_rss_mib"])
    assert res["optimizer"]["name"] == "rmsprop" and (res["micro_batch"], res["grad_accum"]) == (4, 1)
    assert "above import" in printed and "rmsprop" in printed and "4×1" in printed
    (run,) = [x for x in r["runs"] if x["config"] == "fp32"]
    assert run["tokens_exact"] and run["pairs"] == 8 and run["train_pairs"] == 12
    # Whatever the machine's load: the tokens and FLOPs are those of exactly the pairs of the timed
    # steps 2 and 3 (the loop's seeded order over the same 12 pairs), and every rate is one of those
    # counts over the same measured time.
    dims = flops.model_dims(str(tiny_model))
    assert r["model"] == {"params": dims.params, "nonemb_params": dims.nonemb_params, "hidden": dims.hidden,
                          "vocab": dims.vocab, "layers": dims.layers, "attn_dim": dims.attn_dim, "frozen": False}
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
    # the kind of CPU is recorded and printed: its bf16-relevant flags and torch's vector ISA
    from directpo.precision import cpu_identity

    ident = cpu_identity()
    assert r["machine"]["cpu_flags"] == ident["flags"] and r["machine"]["cpu_isa"] == ident["isa"]
    assert f"torch ISA {ident['isa']}" in printed


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
def _bench_against_trl(tiny_model, tmp_path, *flags: str) -> dict:
    """`directpo bench` of both systems on 16 review pairs, batch 4, one round; its JSON."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL not installed")
    train, _ = review_task(n_train=16, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model), "--data", str(data), "--batch", "4", "--rounds", "1",
                 "--threads", "1", "--max-length", "128", "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.mark.trl
def test_bench_against_trl(tiny_model, tmp_path):
    r = _bench_against_trl(tiny_model, tmp_path, "--steps", "2", "--micro-batch", "2")
    configs = {(x["system"], x["config"]) for x in r["results"] if x["pairs_per_s"]}
    assert {("directpo", "fp32"), ("trl", "fp32 (live ref)"), ("trl", "precompute_ref fp32"),
            ("trl", "precompute_ref fp32 +gc")} <= configs
    # like with like: the optimizer TRL actually built is directpo's, hyper-parameter for hyper-parameter,
    # and both accumulate 2 micro-batches of 2; memory is also given above each process's imports
    optimizers = [x["optimizer"] for x in r["runs"]]
    assert all(o["name"] == "rmsprop" for o in optimizers)
    for k in ("lr", "alpha", "eps", "momentum", "weight_decay", "centered"):
        assert len({o[k] for o in optimizers}) == 1, k
    assert {(x["micro_batch"], x["grad_accum"]) for x in r["runs"]} == {(2, 2)}
    assert all(0 < x["import_rss_mib"] < x["peak_rss_mib"] for x in r["runs"])
    assert {x["grad_ckpt"] for x in r["runs"] if x["system"] == "trl"} == {False, True}
    assert r["comparison"]["peak_above_import_mib"]["ratio"] > 0
    trl = [x for x in r["runs"] if x["system"] == "trl"]
    assert all(x["train_pairs"] == 12 and x["pairs"] == 8 for x in trl)
    # Same pairs, same padded-equivalent token definition: per-pair tokens agree across systems
    # (up to which 4 pairs each system's shuffle put in its untimed warm-up step).
    per_pair = [x["tokens"] / x["pairs"] for x in r["runs"]]
    assert max(per_pair) / min(per_pair) < 1.2
    assert r["comparison"]["pairs_per_s"]["ratio"] > 0
    assert len(r["comparison"]["pairs_per_s"]["ratio_per_round"]) == r["settings"]["rounds"]
    assert all(x["trainable_params"] == r["model"]["params"] for x in r["runs"])  # full fine-tuning


@pytest.mark.slow
@pytest.mark.trl
def test_bench_lora_against_trl(tiny_model, tmp_path, capsys):
    """--lora-r: both systems train the same adapters (every linear layer, directpo's α), FLOPs
    counted without weight gradients, and the header says so."""
    r = _bench_against_trl(tiny_model, tmp_path, "--steps", "1", "--lora-r", "4")
    assert r["settings"]["lora_r"] == 4 and r["model"]["frozen"] is True
    assert "LoRA r 4 on every linear layer, both systems" in capsys.readouterr().out
    runs = [x for x in r["runs"] if x.get("pairs_per_s")]
    assert {x["system"] for x in runs} == {"directpo", "trl"}
    counts = {x["trainable_params"] for x in runs}
    assert len(counts) == 1 and 0 < counts.pop() < r["model"]["params"] / 4  # the same adapters, only them


# ------------------------------------------------------------------------------------------------
# Memory checks: --plan-check and --fsdp-memory (directpo.bench.plan_check, fsdp_memory, procfs)

STATUS = """Name:\tpython
Umask:\t0022
State:\tR (running)
VmPeak:\t 2250376 kB
VmSize:\t 2250372 kB
VmHWM:\t  812345 kB
VmRSS:\t  700000 kB
RssAnon:\t  600000 kB
RssFile:\t   99000 kB
RssShmem:\t    1000 kB
Threads:\t3
"""


def test_status_and_environ_parsers():
    from directpo.bench import fsdp_memory, plan_check, procfs

    st = procfs.parse_status(STATUS)
    assert st == {"VmHWM": 812345 * 1024, "VmRSS": 700000 * 1024, "RssAnon": 600000 * 1024,
                  "RssFile": 99000 * 1024, "RssShmem": 1000 * 1024}
    assert procfs.parse_status("Name:\tpython\nState:\tZ (zombie)\n") == {}  # an exited process
    assert procfs.parse_environ(b"RANK=1\0WORLD_SIZE=2\0EMPTY=\0junk\0") == {"RANK": "1", "WORLD_SIZE": "2",
                                                                            "EMPTY": ""}
    run = {"processes": [{"role": "rank 0", "peak": 5}, {"role": "rank 0", "peak": 7}, {"role": "rank 1", "peak": 6},
                         {"role": "torchrun", "peak": 1}]}
    assert fsdp_memory.peaks_by_role(run) == {"rank 0": 7, "rank 1": 6, "torchrun": 1}
    assert plan_check.ratio(3.0, 2.0) == 1.5 and plan_check.ratio(None, 2.0) is None and plan_check.ratio(1.0, 0) is None


def test_watch_keeps_each_process_peak(tmp_path):
    """The poller reads a live process's VmHWM and names a torchrun worker by RANK= in its environment."""
    import os
    import sys

    from directpo.bench import fsdp_memory

    code = "import time; x = bytearray(96 << 20); x[::4096] = b'x' * len(x[::4096]); del x; time.sleep(0.6)"
    env = {**os.environ, "RANK": "0"}
    run = fsdp_memory.watch([sys.executable, "-c", code, "directpo"], env, tmp_path / "log", interval=0.02)
    assert run["rc"] == 0
    peaks = fsdp_memory.peaks_by_role(run)
    assert peaks["rank 0"] >= 96 << 20  # freed before the poll, still the peak
    (proc,) = run["processes"]
    assert max(proc["series"].values()) == proc["peak"]


def test_phase_peaks_split_at_the_step_lines():
    from directpo.bench import fsdp_memory

    log = [(1.0, "[directpo] data: 16 examples"), (3.0, "[directpo] training dpo: 2 steps × 2 examples"),
           (5.2, "[directpo] step 1/2 loss 0.69"), (9.0, "[directpo] step 2/2"), (12.0, "[directpo] saved model")]
    processes = [{"role": "rank 0", "series": {"0.0": 10, "1.5": 12, "2.5": 15, "4.5": 30, "5.5": 20, "8.5": 25,
                                               "9.0": 40}},
                 {"role": "rank 1", "series": {"0.0": 99}}]
    marks = [{"mark": "load_begin", "role": "rank 0", "t": 0.9, "rss": 8}, {"mark": "load_begin", "role": "rank 1",
                                                                            "t": 0.95, "rss": 7},
             {"mark": "reference_begin", "role": "rank 0", "t": 2.0, "rss": 13},
             {"mark": "reference_end", "role": "rank 0", "t": 2.9, "rss": 13}]
    run = {"log": log, "processes": processes, "marks": marks}
    assert fsdp_memory.phase_bounds(run) == {"load": 0.0, "reference": 2.0, "training": 3.0,
                                        "last checkpoint + export": 9.0}
    assert fsdp_memory.phase_peaks(run, "rank 0") == {"load": 12, "reference": 15, "training": 30,
                                                 "last checkpoint + export": 40}
    assert fsdp_memory.baselines(run) == {"rank 0": 8, "rank 1": 7}
    # raw readings, each at the time it was made, and a mark's own peak (up to the mark) in the phase it ends
    # (time, peak, RSS, anon, file)
    readings = [(1.95, 12, 11, 8, 3), (2.0, 14, 12, 9, 3), (2.05, 16, 15, 9, 6), (3.0, 17, 17, 14, 3),
                (3.05, 30, 20, 17, 3), (9.0, 31, 25, 22, 3), (9.05, 40, 26, 23, 3)]
    run["processes"] = [{"role": "rank 0", "series": {}, "readings": readings}]
    run["marks"] = marks[:2] + [{**marks[2], "hwm": 13}] + marks[3:]
    assert fsdp_memory.phase_peaks(run, "rank 0") == {"load": 13, "reference": 16, "training": 30,
                                                 "last checkpoint + export": 40}
    # RSS at each phase's start: the baseline, the role's own reference mark, else the first reading in it
    assert fsdp_memory.phase_parts(run, "rank 0") == {
        "load": {"rss_at_start": 8, "anon_max": 8, "file_max": 3},
        "reference": {"rss_at_start": 13, "anon_max": 9, "file_max": 6},
        "training": {"rss_at_start": 17, "anon_max": 17, "file_max": 3},
        "last checkpoint + export": {"rss_at_start": 25, "anon_max": 23, "file_max": 3}}
    assert fsdp_memory.phase_parts(run, "rank 1") == {}
    # without the hook's marks: the reference pass ends at its log line (the load phase runs up to it) ...
    ref_line = [(2.6, "[directpo] reference log-probs (train): 2 processes computed 8 examples each (16 in all)")]
    run = {"log": sorted(log + ref_line), "processes": processes}
    assert fsdp_memory.phase_peaks(run, "rank 0") == {"load": 15, "reference": 0, "training": 30,
                                                 "last checkpoint + export": 40}
    # ... and without that line (code that logs none) it is empty: all of setup counts as the load
    run = {"log": log, "processes": processes}
    assert fsdp_memory.phase_peaks(run, "rank 0")["load"] == 15 and fsdp_memory.baselines(run) == {}
    # the saved series are merged into coarser buckets (their maximum), the peaks unchanged
    run = {"processes": [{"role": "rank 0", "series": {"0.00": 1, "0.10": 3, "0.40": 2, "0.50": 5, "1.10": 4},
                          "anon": {"0.00": 1}, "file": {}, "readings": [(0.0, 1)]}]}
    fsdp_memory.coarsen(run, 0.5)
    assert run["processes"][0]["series"] == {"0.0": 3, "0.5": 5, "1.0": 4} and run["series_bucket_s"] == 0.5
    assert "readings" not in run["processes"][0]
    run["wall_s"] = 150.0  # a long run: buckets long enough for ~200 of them (a multiple of 0.5 s)
    fsdp_memory.coarsen(run, 0.5, max_points=200)
    assert run["processes"][0]["series"] == {"0.0": 5, "1.0": 4} and run["series_bucket_s"] == 1.0


def test_mark_hook_marks_the_load_and_the_reference_pass(tmp_path):
    """The measured commands' sitecustomize wraps load_model/empty_model and dataset_logps before any
    module binds them, and prints a mark line (rank, time, RSS) at the first call of each."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import directpo
    from directpo.bench import fsdp_memory

    hook = fsdp_memory.write_mark_hook(tmp_path / "hook")
    src = str(Path(directpo.__file__).parent.parent)
    missing = str(tmp_path / "none")
    code = ("from directpo.logprobs import dataset_logps\n"
            "from directpo import models\n"
            "assert dataset_logps.__wrapped__ is not None and models.load_model.__wrapped__ is not None\n"
            f"for call in (lambda: models.load_model({missing!r}), lambda: models.load_model({missing!r}),\n"
            "             lambda: dataset_logps(None, []), lambda: dataset_logps(None, [])):\n"
            "    try:\n        call()\n    except Exception:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), src]), "RANK": "1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    marks = fsdp_memory.parse_marks([(0.0, x) for x in out.stderr.splitlines()], t0)
    assert [m["mark"] for m in marks] == ["load_begin", "reference_begin", "reference_end"]  # first calls only
    assert all(m["role"] == "rank 1" and m["rss"] > 0 and m["hwm"] > 0 and 0 <= m["t"] < 60 for m in marks)


def _mark(name, rss, peak, **extra):
    return {"mark": name, "rss": rss << 20, "peak": peak << 20, "rss_anon": 0, "rss_file": 0, **extra}


def test_plan_check_arithmetic():
    """Measured figures from the phase marks, the plan's figures at the tokens that ran, and the ratios."""
    from directpo.bench import plan_check
    from directpo.training.plan import PlanConfig, Shape, activation_bytes, head_bytes

    marks = [_mark("start", 100, 100), _mark("load_begin", 300, 310),
             _mark("load_end", 340, 350, param_bytes=40 << 20), _mark("step_begin", 345, 400, step=1),
             _mark("optimizer_begin", 390, 600, step=1, grad_bytes=40 << 20),
             _mark("optimizer_end", 470, 480, step=1, state_bytes=80 << 20),
             _mark("step_begin", 470, 470, step=2), _mark("optimizer_begin", 520, 700, step=2, grad_bytes=40 << 20),
             _mark("optimizer_end", 520, 530, step=2, state_bytes=80 << 20), _mark("end", 520, 560)]
    meas = plan_check.phases(marks)
    M = 1 << 20
    assert meas["baseline_rss"] == 300 * M and meas["weights"] == 40 * M and meas["load_peak"] == 50 * M
    assert meas["gradients"] == 45 * M and meas["optimizer"] == 80 * M  # RSS over the 1st backward / step
    assert [s["fwd_bwd_peak"] for s in meas["steps"]] == [255 * M, 230 * M]
    assert meas["training_peak"] == 400 * M and meas["final_save_peak"] == 260 * M
    assert meas["reference_pass_peak"] == 100 * M

    s = Shape(params=10 << 20, head=1 << 20, block=1 << 20, layers=2, hidden=64, q_dim=64, kv_dim=128,
              intermediate=176, lora_per_rank=0, tied=False)
    pcfg = PlanConfig(model="m", batch_size=4, micro_batch_size=4, max_length=128, optimizer="adamw")
    pred = plan_check.predicted(s, pcfg, [[300, 100], [500]], pairs=8)
    head = head_bytes(s, pcfg)
    per_token = (activation_bytes(s, pcfg, 1) - head) / 256
    assert pred["activations_per_token"] == pytest.approx(per_token)
    assert pred["activations_by_step"] == pytest.approx([per_token * 300 + head, per_token * 500 + head])
    assert pred["weights"] == pred["gradients"] == 40 * M and pred["optimizer"] == 80 * M
    # the peak step: step 2, with the optimizer state made by step 1
    assert pred["total"] == pytest.approx(40 * M + 40 * M + 80 * M + 64 + pred["activations_by_step"][1])
    rows = plan_check.compare(meas, pred)
    total = next(r for r in rows if r["component"].startswith("total (training peak)"))
    assert total["ratio"] == pytest.approx(400 * M / pred["total"])
    act = next(r for r in rows if r["component"].startswith("activations"))
    assert "step 2, 500 tokens" in act["component"]
    assert act["predicted"] == pytest.approx(pred["activations_by_step"][1] + 40 * M)
    assert act["ratio"] == pytest.approx(230 * M / act["predicted"])


def test_plan_check_counts_the_head_at_the_label_rows_that_ran():
    """The plan's LM-head term is a bound (one whole 32 MiB chunk of logits); evaluated at the rows
    a micro-batch really had: a chunk of its own rows when they fit one chunk, else a whole one."""
    from directpo.bench import plan_check
    from directpo.training.plan import HEAD_CHUNK_BYTES, PlanConfig, Shape, head_bytes

    s = Shape(params=10 << 20, head=1 << 20, block=1 << 20, layers=2, hidden=64, q_dim=64, kv_dim=128,
              intermediate=176, lora_per_rank=0, tied=False, vocab=1024)  # a chunk: 8192 rows
    pcfg = PlanConfig(model="m", batch_size=4, micro_batch_size=4, max_length=128)
    grads_of_head = 4 * 1024 * 64  # the head's gradient of this micro-batch
    assert head_bytes(s, pcfg) == HEAD_CHUNK_BYTES + grads_of_head
    assert plan_check.head_as_run(s, pcfg, 10) == 4 * 10 * 1024 + grads_of_head
    assert plan_check.head_as_run(s, pcfg, 9000) == HEAD_CHUNK_BYTES + grads_of_head
    pred = plan_check.predicted(s, pcfg, [[300, 100], [500]], pairs=8, label_rows=[[10, 5], [9000]])
    per_token = pred["activations_per_token"]
    assert pred["max_label_rows_by_step"] == [10, 9000]
    assert pred["activations_by_step"] == pytest.approx([per_token * 300 + plan_check.head_as_run(s, pcfg, 10),
                                                         per_token * 500 + head_bytes(s, pcfg)])


def test_plan_check_end_to_end(tiny_model, tmp_path, capsys):
    """One real --plan-check on the tiny model: the JSON has the figures and finite ratios (how close
    they are is a benchmark, docs/results/bench/plan-vs-measured.md, not a test)."""
    import math

    train, _ = review_task(n_train=8, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "plan-check.json"
    rc = main(["bench", "--plan-check", "--model", str(tiny_model), "--data", str(data), "--batch", "2",
               "--steps", "1", "--max-length", "64", "--threads", "1", "--optimizer", "adamw", "--allocator", "mmap",
               "--out", str(out)])
    assert rc == 0
    assert "total (training peak)" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["settings"]["optimizer"] == "adamw" and r["settings"]["steps"] == 2
    assert list(r["runs"]) == ["mmap"] and r["runs"]["mmap"]["env"] == {"MALLOC_MMAP_THRESHOLD_": "65536"}
    m, p = r["runs"]["mmap"]["measured"], r["predicted"]
    assert m["baseline_rss"] > 0 and m["training_peak"] > 0 and len(m["steps"]) == 2
    assert m["steps"][0]["grad_bytes"] == m["param_bytes"] == p["weights"]  # fp32, every parameter trained
    assert m["steps"][0]["state_bytes"] >= 2 * m["param_bytes"]  # AdamW: two states (+ its step counters)
    assert all(t > 0 for t in p["max_tokens_by_step"])
    ratios = [row["ratio"] for row in r["rows"]]
    assert ratios and all(x is not None and math.isfinite(x) and x > 0 for x in ratios)


# ------------------------------------------------------------------------------------------------
# --sample: directpo's sampler against transformers' generate (directpo.bench.sampling)


def test_sample_bench_arithmetic():
    from directpo.bench import sampling

    assert sampling.parse_ks("1, 16,1") == [1, 16]
    for bad in ("0", "a", ""):
        with pytest.raises(ValueError, match="--sample-k"):
            sampling.parse_ks(bad)
    runs = [{"k": 4, "system": s, "tokens_per_s": v, "samples_per_s": v / 10, "peak_rss_mib": m,
             "rss_above_import_mib": m - 300, "seconds": 1.0, "tokens": v, "tokens_per_cpu_s": v}
            for s, v, m in (("directpo", 300.0, 400.0), ("generate", 100.0, 500.0), ("directpo", 200.0, 410.0),
                            ("generate", 150.0, 450.0), ("directpo", 250.0, 420.0))]
    runs.append({"k": 4, "system": "generate", "error": "exit status 1"})  # a failed run counts for nothing
    (row,) = sampling.summarize(runs, [4])
    assert row["directpo"]["tokens_per_s"] == 250.0 and row["generate"]["tokens_per_s"] == 125.0  # medians
    assert (row["directpo"]["rounds_ok"], row["generate"]["rounds_ok"]) == (3, 2)
    assert row["ratio"]["tokens_per_s"] == pytest.approx(2.0)
    assert row["ratio"]["peak_rss_mib"] == pytest.approx(410.0 / 475.0)
    assert row["ratio"]["rss_above_import_mib"] == pytest.approx(110.0 / 175.0)


def test_sample_bench_end_to_end(tiny_model, tmp_path, capsys):
    """Both systems in their own processes on the same rows: figures, JSON and the markdown table."""
    prompts = write_jsonl([{"prompt": "Review of Ka:"}, {"prompt": "Review of Kalomirento, a film"}],
                          tmp_path / "p.jsonl")
    out = tmp_path / "res" / "sample.json"
    assert main(["bench", "--sample", "--model", str(tiny_model), "--data", str(prompts), "--sample-k", "2",
                 "--sample-rows", "4", "--sample-batch", "4", "--max-new-tokens", "3", "--rounds", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (out.parent / "sample.md").read_text().strip() == r["table"] in capsys.readouterr().out
    assert r["settings"]["k"] == [2] and r["settings"]["prompt_tokens"]["2"][0] < r["settings"]["prompt_tokens"]["2"][1]
    runs = {x["system"]: x for x in r["runs"]}
    assert set(runs) == {"directpo", "generate"}
    for x in runs.values():
        assert x["samples"] == 4 and 4 <= x["tokens"] <= 12  # 2 prompts × 2 samples, 1 to 3 tokens each
        assert x["tokens_per_s"] == pytest.approx(x["tokens"] / x["seconds"])
        assert x["tokens_per_cpu_s"] == pytest.approx(x["tokens"] / x["cpu_seconds"]) and x["cpu_seconds"] > 0
        assert x["peak_rss_mib"] > x["import_rss_mib"] > 0
        assert x["rss_above_import_mib"] == pytest.approx(x["peak_rss_mib"] - x["import_rss_mib"])
    (row,) = r["results"]
    assert row["ratio"]["tokens_per_s"] == pytest.approx(runs["directpo"]["tokens_per_s"] /
                                                         runs["generate"]["tokens_per_s"])
    assert "| 2 | transformers generate |" in r["table"]
    assert main(["bench", "--sample", "--plan-check", "--model", "m", "--data", "d"]) == 2
    assert "--sample and --plan-check are two separate measurements" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# --end-to-end: the whole command (directpo.bench.end_to_end)


@pytest.mark.trl
def test_end_to_end_bench_times_both_whole_commands(tiny_model, tmp_path, capsys):
    """Both whole commands run (2 steps, 1 round), save a model, and account for their wall time by
    phase; a stage of directpo's loop renamed away would show as a missing stage here."""
    from directpo.bench.end_to_end import PHASES

    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL not installed")
    train, _ = review_task(n_train=12, n_eval=1)
    data = write_jsonl(train, tmp_path / "pairs.jsonl")
    out = tmp_path / "e2e.json"
    assert main(["bench", "--end-to-end", "--model", str(tiny_model), "--data", str(data), "--batch", "4",
                 "--steps", "2", "--rounds", "1", "--threads", "1", "--max-length", "128", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["pairs"] == 12 and r["settings"]["optimizer"] == "rmsprop"
    assert [x["system"] for x in r["results"]] == ["directpo", "trl"]
    for run in r["runs"]:
        assert "error" not in run, run
        assert run["steps"] == 2 and run["saved"] and "missing_stages" not in run
        assert set(run["phases"]) == set(PHASES)
        assert all(run["phases"][p] > 0 for p in ("import", "load", "reference", "steps", "save"))
        assert sum(run["phases"][p] for p in PHASES[:-1]) <= run["wall_s"]
        assert sum(run["phases"].values()) == pytest.approx(run["wall_s"])
    walls = {x["system"]: x["wall_s"] for x in r["results"]}
    assert r["ratio"] == pytest.approx(walls["trl"] / walls["directpo"])
    table = (tmp_path / "e2e.md").read_text()
    assert "| system | whole command s | import | load | tokenize | reference | steps | save | other |" in table
    assert "| directpo |" in table and "| trl |" in table and table.strip() in capsys.readouterr().out


def test_comparison_gives_the_ratio_round_by_round():
    """Each round: directpo's best configuration against that round's fastest TRL configuration."""
    from directpo.bench.report import compare_systems

    runs = [{"round": 1, "system": "directpo", "config": "fp32", "pairs_per_s": 20.0},
            {"round": 1, "system": "trl", "config": "a", "pairs_per_s": 2.0},
            {"round": 1, "system": "trl", "config": "b", "pairs_per_s": 2.5},
            {"round": 2, "system": "directpo", "config": "fp32", "pairs_per_s": 18.0},
            {"round": 2, "system": "trl", "config": "a", "pairs_per_s": 2.0},
            {"round": 2, "system": "trl", "config": "b", "pairs_per_s": None}]  # (failed that round)
    results = [{"system": "directpo", "config": "fp32", "pairs_per_s": 19.0, "peak_rss_mib": 700.0},
               {"system": "trl", "config": "a", "pairs_per_s": 2.0, "peak_rss_mib": 2600.0},
               {"system": "trl", "config": "b", "pairs_per_s": 2.5, "peak_rss_mib": 2500.0}]
    c = compare_systems(results, runs)
    assert c["pairs_per_s"]["ratio"] == 19.0 / 2.5
    assert c["pairs_per_s"]["ratio_per_round"] == [20.0 / 2.5, 18.0 / 2.0]
    assert "ratio_per_round" not in compare_systems(results)["pairs_per_s"]  # (no runs: medians only)
