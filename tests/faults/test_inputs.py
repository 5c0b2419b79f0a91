"""Issue #27, item 6 and part of 9: memory bounded by the settings, not by the data (a 50 MB row);
a model folder without tokenizer files, or with custom code, is one line naming the folder; the
length-bias numbers of `train` and `inspect` say what they measure."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from directpo.cli import main
from directpo.toy import review_task, write_jsonl

ROW_MB = 50


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=8, n_eval=1, seed=7)
    return write_jsonl(rows, tmp_path_factory.mktemp("inputs") / "d.jsonl")


def test_a_50mb_row_trains_in_under_1gb(tiny_model, tmp_path):
    """Before, the row's prompt and chosen response (50 MB each) were tokenized whole, then cut to
    512 tokens: 14.3 GB peak and 332 s for this run. Now each text is cut before it is tokenized
    (0.6 GB, 8 s: the JSON line and the libraries), and the trained weights are the same."""
    rows, _ = review_task(n_train=8, n_eval=1, seed=7)
    words = " ".join(r["chosen"] + " " + r["rejected"] for r in rows) + " "
    big = (words * (ROW_MB * 1_000_000 // len(words) + 1))[:ROW_MB * 1_000_000]
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(json.dumps({"prompt": big, "chosen": big, "rejected": " No."}) + "\n")
    del big
    cli = [sys.executable, "-c", "import sys; from directpo.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
           "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--warmup-steps", "0",
           "--no-progress", "--threads", "1"]
    # A parent of its own, so that RUSAGE_CHILDREN is this run's peak alone.
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.stderr, file=sys.stderr); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cli], capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    rc, peak_kb = map(int, out.stdout.split())
    assert rc == 0, out.stderr[-3000:]
    assert "2 texts longer than" in out.stderr and "were cut before tokenizing" in out.stderr
    assert peak_kb < 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert (tmp_path / "run" / "run_complete.json").exists()


def test_a_model_folder_without_tokenizer_files_is_one_line(tiny_model, data, tmp_path, capsys, monkeypatch):
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, notok / name)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "notok", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "no tokenizer files in notok/ (expected tokenizer.json or tokenizer_config.json + vocab files)" in err
    assert "sentencepiece" not in err
    shutil.copy(tiny_model / "tokenizer_config.json", notok / "tokenizer_config.json")  # a config, no vocabulary
    assert main(argv) == 2
    assert "no tokenizer files in notok/" in _one_line(capsys)


def _custom_code_model(tiny_model, folder: Path, tokenizer_too: bool = False) -> Path:
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_x.py", "modeling_x.py", "tokenization_x.py"):
        (folder / name).write_text("raise SystemExit('custom code ran')\n")
    if tokenizer_too:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="XTok", auto_map={"AutoTokenizer": ["tokenization_x.XTok", None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.mark.parametrize("tokenizer_too", [False, True])
def test_refused_custom_code_names_the_flag_and_the_folder(tiny_model, data, tmp_path, capsys, tokenizer_too):
    folder = _custom_code_model(tiny_model, tmp_path / "custom", tokenizer_too)
    argv = ["train", "--model", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "1", "--no-progress", "--threads", "1", "--max-length", "64"]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "--trust-remote-code" in err and str(folder) in err and "modeling_x.py" in err
    assert "trust_remote_code=True" not in err and "hf.co" not in err and "huggingface.co" not in err


def test_empty_model_and_reference_loading_explain_custom_code(tiny_model, tmp_path):
    from directpo.models import empty_model, load_model

    folder = _custom_code_model(tiny_model, tmp_path / "custom")
    for load in (load_model, empty_model):
        with pytest.raises(ValueError, match="--trust-remote-code") as e:
            load(str(folder))
        assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_length_bias_says_what_it_measures(tiny_tokenizer, tmp_path):
    """`train`'s paragraph measures the examples as trained (after truncation), `inspect` the
    untruncated ones: each says so, and the red flags too."""
    from directpo.data import load_examples, tokenize_examples
    from directpo.data.checks import red_flags, summarize, summary_paragraph

    rows = [{"prompt": "Review:", "chosen": " It was warm and moving and I liked it very much." * 4, "rejected": " No."}
            for _ in range(10)]
    path = write_jsonl(rows, tmp_path / "bias.jsonl")
    examples = load_examples(str(path))
    trained = tokenize_examples(examples, tiny_tokenizer, max_length=8)
    full = tokenize_examples(examples, tiny_tokenizer)
    as_trained, untruncated = summarize(trained, tiny_tokenizer), summarize(trained, tiny_tokenizer, full=full)
    assert as_trained["length_bias"]["basis"] == "as trained" and untruncated["length_bias"]["basis"] == "untruncated"
    text = summary_paragraph(as_trained)
    assert "As trained (in tokens after truncation to --max-length" in text and "directpo inspect" in text
    assert "Before truncation, the chosen response is the longer one in 100.0 % of pairs" in summary_paragraph(untruncated)
    assert any(f.startswith("length bias (before truncation): the chosen") for f in red_flags(untruncated))


def _partial_model(tiny_model, folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(tiny_model / name, folder / name)
    return folder


def test_a_folder_that_holds_no_model_is_one_line_in_train_and_plan(tiny_model, data, tmp_path, capsys):
    """Before: train said transformers' "Unrecognized model in X. Should have a `model_type` key in its
    config.json" (there is no config.json at all), and plan printed that ValueError's traceback as a bug."""
    empty = _partial_model(tiny_model, tmp_path / "empty", ())
    for argv in (["train", "--model", str(empty), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                  "--max-steps", "1"], ["plan", "--model", str(empty)]):
        assert main(argv) == 2
        err = _one_line(capsys)
        assert f"{empty}: no config.json" in err and "model_type" not in err


def test_a_hub_id_that_cannot_be_reached_is_one_line_in_train_and_plan(data, tmp_path, capsys, monkeypatch):
    """Offline (the tests set HF_HUB_OFFLINE=1): before, train and plan printed transformers' two-line
    message without the model's name."""
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--model", "no-org/no-model", "--data", str(data), "--output-dir", "run", "--max-steps", "1"],
                 ["plan", "--model", "no-org/no-model"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "\n" not in err.split("error: ", 1)[1], err
        assert "no-org/no-model: not a local directory, and the Hugging Face hub could not provide it" in err


def test_a_folder_without_weights_says_so(tiny_model, data, tmp_path, capsys):
    """Before: "no safetensors weights found ... Convert it with `save_pretrained` first", for a folder
    with no weights of any kind (a copy that left out the weights) to convert."""
    folder = _partial_model(tiny_model, tmp_path / "noweights", ("config.json", "tokenizer.json",
                                                                 "tokenizer_config.json"))
    assert main(["score", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
    err = _one_line(capsys)
    assert f"{folder}: no weights" in err and "save_pretrained" not in err
    (folder / "pytorch_model.bin").write_bytes(b"")  # a pickled checkpoint: the advice to convert it stays
    assert main(["score", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "save_pretrained" in _one_line(capsys)


def test_a_tokenizer_without_pad_or_eos_token_trains_and_scores(tiny_model, data, tmp_path, capsys):
    """Before: `torch.full(..., None)` in the collator, a traceback reported as a bug in directpo
    (train, score, inspect, sample). Padding is masked out, so any token pads."""
    folder = tmp_path / "noeos"
    shutil.copytree(tiny_model, folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        tc.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": None, "eos_token_id": None}))
    from directpo.models import load_tokenizer

    tok = load_tokenizer(str(folder))
    assert tok.eos_token_id is None and tok.pad_token_id is not None
    assert main(["train", "--model", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--no-progress",
                 "--threads", "1"]) == 0
    assert main(["score", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    assert main(["sample", "--model", str(folder), "--prompts", str(data), "--out", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "3", "--no-progress"]) == 0


_OFFLINE_LOAD = r"""
import sys, time
from directpo.data.readers import read_records
from directpo.models import load_config, load_tokenizer
t = time.time()
print(type(load_config("me/cached")).__name__, type(load_tokenizer("me/cached")).__name__)
try:
    load_config("me/missing")
except OSError as e:
    print("ERR", e)
try:
    list(read_records("me/missing-data"))
except ValueError as e:
    print("DATAERR", e)
print("SECONDS", time.time() - t)
"""


def test_a_hub_that_cannot_be_reached_serves_the_cache_at_once_and_refuses_the_rest_at_once(tiny_model, tmp_path):
    """Before: without network a hub id took ~50 s of retries to fail (`sample --model owner/name`: 51 s,
    `inspect --data owner/name`: 30 s).
    Now an unreachable hub (here a closed local port) puts huggingface_hub offline for the process."""
    import os
    import shutil
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--me--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
           and not k.lower().endswith("_proxy")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")  # (port 9: nothing listens)
    out = subprocess.run([sys.executable, "-c", _OFFLINE_LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("LlamaConfig ")  # the cached model (config and tokenizer), offline
    err = next(line for line in out.stdout.splitlines() if line.startswith("ERR"))
    assert "me/missing: not a local directory, and not in the local Hugging Face cache" in err
    assert "cannot be reached" in err
    data_err = next(line for line in out.stdout.splitlines() if line.startswith("DATAERR"))
    assert "me/missing-data" in data_err and "the hub cannot be reached" in data_err
    assert float(out.stdout.split("SECONDS")[1]) < 30  # (the retries alone took ~50 s for a model, ~30 s for data)


def test_no_hub_probe_behind_a_proxy_or_when_offline_already(monkeypatch):
    from huggingface_hub import constants

    from directpo.data import readers

    for name, value in (("HTTPS_PROXY", "http://proxy:3128"), ("HF_HUB_OFFLINE", None)):
        monkeypatch.setattr(readers, "_hub_probe", None)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value is None)
        if value:
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("probed"))
        assert readers.offline_if_unreachable() is False
