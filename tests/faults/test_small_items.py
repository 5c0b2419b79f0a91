"""Issue #27, item 9, the smaller items: reference log-probs only for the examples a --max-steps run
uses; sizes below a MiB said in KiB (tests/training/test_memory_budget.py); a cache folder that
cannot be one named by its variable; what a LoRA run saved; `inspect` bounded on a huge row; custom
code refused in one line by every loader; weight files of the usual mode wherever they are written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from directpo.toy import review_task, write_jsonl

N_TRAIN = 16

# one tokenized pair, as the reference cache keys it (prompt ids, the responses' ids)
ONE_PAIR = SimpleNamespace(prompt_ids=[1, 2], response_ids=[[3], [4]])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(review_task(n_train=N_TRAIN, n_eval=2, seed=3)[0], tmp_path_factory.mktemp("small") / "d.jsonl")


def _cfg(tiny_model, data, out, **kw):
    from directpo.training import TrainConfig

    base = dict(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=4, micro_batch_size=4,
                max_steps=2, warmup_steps=0, progress=False, max_length=48, threads=1)
    return TrainConfig(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]


# ---- reference log-probs for the examples the run uses ----

def test_used_examples_are_the_batches_of_the_steps():
    from directpo.training import TrainConfig
    from directpo.training.loop import batch_order
    from directpo.training.prepare import used_examples

    cfg = TrainConfig(model="m", data="d", output_dir="o", batch_size=4, max_steps=3, seed=5)
    order = batch_order(2312, 4, 5)
    assert used_examples(cfg, 2312, batch_order) == sorted(i for _ in range(3) for i in next(order)[1])
    assert len(used_examples(cfg, 2312, batch_order)) == 12
    assert used_examples(cfg, 12, batch_order) is None  # three steps of 4 cover an epoch of 12
    cfg.max_steps = None
    assert used_examples(cfg, 2312, batch_order) is None  # whole epochs: every example


def test_a_max_steps_run_computes_only_its_rows_and_the_next_run_reuses_them(tiny_model, data, tmp_path, capsys,
                                                                             one_thread):
    """Before, `--max-steps 2` computed the reference log-probs of all 16 examples (HH: all 2,312 for
    3 steps, 128 of 173 s). Now only the 8 its two batches draw; those rows are cached, each under
    its own example, and a whole epoch after it computes only the 8 others; a resumed run with more
    steps finds the rows of its new steps, and ends as the uninterrupted run does."""
    from safetensors import safe_open

    from directpo.training import train

    cache = tmp_path / "cache"
    train(_cfg(tiny_model, data, tmp_path / "short", ref_cache=str(cache), save_every=1))
    err = capsys.readouterr().err
    assert f"reference log-probs: 8 of {N_TRAIN} examples (the ones --max-steps 2 uses)" in err
    (part,) = cache.glob("*.safetensors")
    with safe_open(str(part), framework="pt") as f:
        assert f.get_tensor("logps").shape[0] == 8

    train(_cfg(tiny_model, data, tmp_path / "epoch", ref_cache=str(cache), max_steps=None, epochs=1))
    err = capsys.readouterr().err
    assert f"reference log-probs: 8 of {N_TRAIN} rows from the cache {part}, 8 computed and cached" in err
    with safe_open(str(part), framework="pt") as f:
        assert f.get_tensor("logps").shape[0] == N_TRAIN  # one file: the reference model's rows

    train(_cfg(tiny_model, data, tmp_path / "short", ref_cache=str(cache), max_steps=3, resume="latest"))
    assert f"reference log-probs: 12 of {N_TRAIN} examples (the ones --max-steps 3 uses)" in capsys.readouterr().err
    train(_cfg(tiny_model, data, tmp_path / "straight", ref_cache="off", max_steps=3))
    resumed, straight = _metrics(tmp_path / "short"), _metrics(tmp_path / "straight")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(resumed, straight):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in resumed)


def test_the_partial_table_keeps_the_whole_shape():
    from directpo.data import TokenizedExample
    from directpo.training.prepare import _rows_of

    examples = [TokenizedExample([1], [[2], [3]]) for _ in range(5)] + [TokenizedExample([1], [[2], [3], [4]])]
    full = _rows_of(torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), [1, 3], examples)
    assert full.shape == (6, 3)
    assert full[1, :2].tolist() == [-1.0, -2.0] and full[3, :2].tolist() == [-3.0, -4.0]
    assert torch.isnan(full[[0, 2, 4, 5]]).all() and torch.isnan(full[[1, 3], 2]).all()


# ---- a cache folder that cannot be one ----

def test_directpo_cache_naming_a_file_is_one_warning_and_the_run_goes_on(tiny_model, data, tmp_path, monkeypatch,
                                                                        capsys, one_thread):
    from directpo import precision, reference
    from directpo.training import train

    bad = tmp_path / "notafolder"
    bad.write_text("x")
    monkeypatch.setenv("DIRECTPO_CACHE", str(bad))
    table, hit = reference.reference_logps(None, [ONE_PAIR], lambda m, ex: torch.zeros(1, 2), cache_dir=reference.default_cache_dir(),
                                           model_fp="m")
    assert table.shape == (1, 2) and not hit
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"[directpo] warning: reference log-probs not cached: DIRECTPO_CACHE={bad} is a file, not a folder; "
                   "going on without the cache"]

    precision._write_cache(precision.cache_path(), {"k": {}})
    assert f"warning: --precision auto: decision not cached: DIRECTPO_CACHE={bad} is a file, not a folder" in \
        capsys.readouterr().err

    result = train(_cfg(tiny_model, data, tmp_path / "run", max_steps=1))  # the default cache: $DIRECTPO_CACHE
    assert result["train"] and bad.read_text() == "x"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Not a directory" not in err
    assert err.count(f"DIRECTPO_CACHE={bad} is a file, not a folder") <= 1  # (said once per process)


def test_cache_folder_problems_are_named(tmp_path, monkeypatch):
    from directpo import precision

    monkeypatch.setenv("DIRECTPO_CACHE", str(tmp_path / "c"))
    assert precision.cache_folder_problem(tmp_path / "c" / "ref_logps") is None  # missing: made when written
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ref_logps").write_text("")
    assert precision.cache_folder_problem(tmp_path / "c" / "ref_logps") == \
        f"DIRECTPO_CACHE={tmp_path / 'c'}: {tmp_path / 'c' / 'ref_logps'} is a file, not a folder"
    assert precision.cache_folder_problem(tmp_path / "elsewhere") is None
    monkeypatch.setattr(precision.os, "access", lambda *a: False)  # (the tests may run as root)
    assert precision.cache_folder_problem(tmp_path / "c" / "x") == f"DIRECTPO_CACHE={tmp_path / 'c'} is not writable"
    assert precision.cache_folder_problem(tmp_path / "mine", named="--ref-cache mine") == \
        f"--ref-cache mine: {tmp_path} is not writable"
    monkeypatch.delenv("DIRECTPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c" / "ref_logps"))
    assert precision.cache_folder_problem(precision.cache_path().parent) == \
        f"XDG_CACHE_HOME={tmp_path / 'c' / 'ref_logps'} is a file, not a folder"


# ---- what a LoRA run says it saved ----

@pytest.mark.parametrize("merge", [False, True])
def test_a_lora_run_says_it_saved_adapters(tiny_model, data, tmp_path, capsys, merge, one_thread):
    from directpo.training import train

    train(_cfg(tiny_model, data, tmp_path / "run", max_steps=1, lora_r=2, merge=merge))
    err = capsys.readouterr().err
    said = "the model merged with its LoRA adapters" if merge else "LoRA adapters (adapter_model.safetensors)"
    assert f"saved {said} and tokenizer to {tmp_path / 'run'}" in err
    assert (tmp_path / "run" / ("model.safetensors" if merge else "adapter_model.safetensors")).exists()
    assert "saved model and tokenizer" not in err


# ---- inspect on a huge row ----

def test_inspect_on_a_50mb_row_stays_bounded(tiny_model, tmp_path):
    """Before, `untruncated()` tokenized a cut example's whole texts again (a 50 MB row: gigabytes,
    as `train` took 14.3 GB before its own bound). Now its texts are cut before tokenizing at
    `UNTRUNCATED_FACTOR` × the limits, and the report says those lengths are lower bounds."""
    rows, _ = review_task(n_train=8, n_eval=1, seed=7)
    words = " ".join(r["chosen"] + " " + r["rejected"] for r in rows) + " "
    big = (words * (50_000_000 // len(words) + 1))[:50_000_000]
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(json.dumps({"prompt": big, "chosen": big, "rejected": " No."}) + "\n")
    del big
    code = ("import json, resource, sys; from directpo.inspect.dataset import inspect_data; "
            "from directpo.models import load_tokenizer; "
            "ins = inspect_data(sys.argv[1], load_tokenizer(sys.argv[2]), max_length=512, progress=False); "
            "print(json.dumps({'cap': ins['untruncated_cap'], 'flags': ins['red_flags'], "
            "'max_prompt': ins['lengths']['untruncated']['prompt']['max'], "
            "'peak_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tiny_model)], capture_output=True, text=True,
                         timeout=600, check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # (this row holds two 50 MB texts, read from a 100 MB JSON line: ~0.7 GB measured alone, up to
    # 1.2 GB beside other tests; before, tens of GB)
    assert got["peak_kb"] < 1536 * 1024, f"peak RSS {got['peak_kb'] / 1024:.0f} MB"
    assert got["cap"] == {"tokens": 2048, "examples": 1} and got["max_prompt"] == 2048
    assert any("1 example is longer than 2048 tokens" in f and "counted up to there" in f for f in got["flags"])


def test_untruncated_lengths_are_whole_below_the_cap(tiny_tokenizer, tmp_path):
    from directpo.data import load_examples, tokenize_examples
    from directpo.inspect.dataset import untruncated

    row = {"prompt": "Review:", "chosen": " It was warm and moving." * 30, "rejected": " No."}
    examples = load_examples(str(write_jsonl([row], tmp_path / "long.jsonl")))
    cut = tokenize_examples(examples, tiny_tokenizer, max_length=16)
    whole = tokenize_examples(examples, tiny_tokenizer)
    assert untruncated(examples, cut, tiny_tokenizer, cap=1000) == whole == untruncated(examples, cut, tiny_tokenizer)
    capped = untruncated(examples, cut, tiny_tokenizer, cap=20)[0]
    assert capped.responses_truncated and 20 <= len(capped.response_ids[0]) < len(whole[0].response_ids[0])


# ---- custom code refused in one line, by every loader ----

def _custom_code(tiny_model, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_x.py", "modeling_x.py"):
        (folder / name).write_text("raise SystemExit('custom code ran')\n")
    return folder


def test_custom_code_is_refused_in_one_line_by_plan_reward_models_and_classifiers(tiny_model, tmp_path):
    from directpo.eval.reward_model import load_reward_backbone
    from directpo.eval.scorers import ClassifierReward
    from directpo.training.plan import model_shape

    folder = _custom_code(tiny_model, tmp_path / "custom")
    for load in (model_shape, lambda f: load_reward_backbone(f, 0), lambda f: ClassifierReward(f, device="cpu")):
        with pytest.raises(ValueError) as e:
            load(str(folder))
        msg = str(e.value)
        assert "\n" not in msg and "--trust-remote-code" in msg and str(folder) in msg and "modeling_x.py" in msg
        assert "trust_remote_code=True" not in msg and "huggingface.co" not in msg


# ---- weight files of the usual mode ----

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _modes(folder: Path) -> dict:
    return {f.name: oct(f.stat().st_mode & 0o777) for f in folder.glob("*.safetensors")}


def test_weights_are_written_with_the_usual_mode_everywhere(tiny_model, tiny_tokenizer, tmp_path):
    """safetensors writes 0600; every other file is 0666 & ~umask (0644), so are the weights now."""
    from safetensors.torch import save_file

    from directpo.bench.runner import _save_vocab_variant
    from directpo.experiments.sentiment.runs import export_checkpoint
    from directpo.models import load_model
    from directpo.rlhf.ppo import save_snapshot
    from directpo.toy import build_tiny_model

    usual = oct(0o666 & ~_umask())
    built = build_tiny_model(tmp_path / "toy", ["a b c d e f"] * 20, hidden=16, layers=1, heads=2, vocab_size=300)
    model = load_model(str(tiny_model))
    save_snapshot(model, tiny_tokenizer, tmp_path / "snapshot")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    export_checkpoint(ckpt, str(tiny_model), tmp_path / "exported")
    _save_vocab_variant(str(tiny_model), len(tiny_tokenizer) + 8, tmp_path / "variant", tiny_tokenizer)
    for folder in (built, tmp_path / "snapshot", tmp_path / "exported", tmp_path / "variant"):
        modes = _modes(folder)
        assert modes and set(modes.values()) == {usual}, (folder, modes)
