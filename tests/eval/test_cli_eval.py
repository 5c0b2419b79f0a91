"""`score`, `sample`, `bon`, `eval`: outputs refused when they exist (without --overwrite) or are an
input, before any model is loaded; bad numbers refused by flag and range; help text."""
import json
import os
import re

import pytest

from directpo.cli import main, make_parser
from directpo.outputs import check_outputs
from directpo.toy import review_task, write_jsonl

MISSING_MODEL = "no-such-model-dir"


@pytest.fixture(autouse=True)
def no_loading(monkeypatch, request):
    """Loading a model, tokenizer or reward is a ValueError "LOADED <what>": the checks must come first."""
    if "tiny_model" in request.fixturenames:
        return
    import directpo.eval.bon
    import directpo.eval.evaluate
    import directpo.eval.sample
    import directpo.eval.score
    import directpo.eval.scorers

    def loaded(*args, **kwargs):  # a user-facing error (a plain ValueError would be a bug: a traceback)
        from directpo.errors import UserValueError
        raise UserValueError(f"LOADED {args[0] if args else kwargs}")

    for mod in (directpo.eval.evaluate, directpo.eval.sample, directpo.eval.score):  # (bon loads through sample's)
        monkeypatch.setattr(mod, "load_model_or_adapter", loaded)  # (their loader: a model or an adapter directory)
        monkeypatch.setattr(mod, "load_tokenizer", loaded)
    for mod in (directpo.eval.bon, directpo.eval.evaluate, directpo.eval.sample, directpo.eval.score):
        monkeypatch.setattr(mod, "load_prompts", loaded, raising=False)
    monkeypatch.setattr(directpo.eval.scorers, "load_reward_fn", loaded)


def _commands(d):
    """(command line without outputs, {output flag: path}) of each command, inputs in `d`."""
    data = str(d / "pairs.jsonl")
    return {
        "score": (["score", "--model", MISSING_MODEL, "--data", data], ["--out"]),
        "sample": (["sample", "--model", MISSING_MODEL, "--prompts", data], ["--out"]),
        "bon": (["bon", "--model", MISSING_MODEL, "--prompts", data, "--n", "2", "--reward-fn", "m:f"], ["--out"]),
        "eval": (["eval", "--model", MISSING_MODEL, "--ref", MISSING_MODEL, "--prompts", data, "--reward-fn", "m:f"],
                 ["--out", "--samples-out", "--plot"]),
    }


@pytest.fixture
def pairs(tmp_path):
    rows, _ = review_task(n_train=3, n_eval=1, seed=1)
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    return tmp_path


@pytest.mark.parametrize("command", ["score", "sample", "bon", "eval"])
def test_existing_output_refused_without_overwrite(pairs, command, capsys):
    args, flags = _commands(pairs)[command]
    for flag in flags:
        line = list(args)
        for i, f in enumerate(flags):  # the others new, this one existing
            line += [f, str(pairs / f"new{i}.out")]
        existing = pairs / "old.out"
        existing.write_text("precious\n")
        line[line.index(flag) + 1] = str(existing)
        assert main(line) == 2
        err = capsys.readouterr().err
        assert err == f"directpo {command}: error: {flag} {existing} exists: pass --overwrite to replace it\n"
        assert existing.read_text() == "precious\n"
        # with --overwrite the check passes and the command goes on, to loading
        assert main(line + ["--overwrite"]) == 2
        assert f"directpo {command}: error: LOADED" in capsys.readouterr().err
        assert existing.read_text() == "precious\n"


def test_existing_output_is_a_file_exists_error(tmp_path):
    (tmp_path / "o.jsonl").write_text("x")
    with pytest.raises(FileExistsError, match="--out .*o.jsonl exists: pass --overwrite to replace it"):
        check_outputs({"--out": str(tmp_path / "o.jsonl")}, {}, overwrite=False)
    check_outputs({"--out": str(tmp_path / "o.jsonl")}, {}, overwrite=True)
    check_outputs({"--out": str(tmp_path / "new.jsonl"), "--plot": None}, {}, overwrite=False)


def test_output_that_is_an_input_refused_even_with_overwrite(pairs, monkeypatch, capsys):
    data = pairs / "pairs.jsonl"
    before = data.read_bytes()
    monkeypatch.chdir(pairs)
    os.symlink(data, pairs / "link.jsonl")
    for out in (str(data), "pairs.jsonl", "./sub/../pairs.jsonl", "link.jsonl"):
        (pairs / "sub").mkdir(exist_ok=True)
        assert main(["score", "--model", MISSING_MODEL, "--data", str(data), "--out", out, "--overwrite"]) == 2
        assert f"--out {out} is the --data input file" in capsys.readouterr().err
    for command, (args, _) in _commands(pairs).items():
        if command == "score":
            continue
        assert main(args + ["--out", "pairs.jsonl", "--overwrite"]) == 2
        assert "--out pairs.jsonl is the --prompts input file: write the output elsewhere (--overwrite never " \
               "replaces an input)" in capsys.readouterr().err
    eval_args = _commands(pairs)["eval"][0]
    assert main(eval_args + ["--out", "r.json", "--samples-out", "pairs.jsonl", "--overwrite"]) == 2
    assert "--samples-out pairs.jsonl is the --prompts input file" in capsys.readouterr().err
    assert main(eval_args + ["--out", "r.json", "--plot", "r.json"]) == 2
    assert "--plot r.json is also the --out output" in capsys.readouterr().err
    assert main(eval_args + ["--out", str(pairs)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_overwrite_replaces_an_existing_output(tiny_model, pairs, capsys):
    out = pairs / "s.jsonl"
    out.write_text("old\n")
    args = ["sample", "--model", str(tiny_model), "--prompts", str(pairs / "pairs.jsonl"), "--out", str(out),
            "--max-new-tokens", "2", "--no-progress"]
    assert main(args) == 2 and out.read_text() == "old\n"
    assert main(args + ["--overwrite"]) == 0
    assert [json.loads(line)["prompt_index"] for line in open(out)] == [0, 1, 2]
    assert not (pairs / "s.jsonl.tmp").exists()


_BASE = {"score": ["score", "--model", "m", "--data", "d", "--out", "o"],
         "sample": ["sample", "--model", "m", "--prompts", "p", "--out", "o"],
         "bon": ["bon", "--model", "m", "--prompts", "p", "--out", "o", "--reward-fn", "a:b"],
         "eval": ["eval", "--model", "m", "--ref", "r", "--prompts", "p", "--out", "o", "--reward-fn", "a:b"]}


@pytest.mark.parametrize("command,flag,value,allowed", [
    ("sample", "--batch-size", "0", "an integer ≥ 1"),
    ("bon", "--batch-size", "-2", "an integer ≥ 1"),
    ("eval", "--batch-size", "0", "an integer ≥ 1"),
    ("score", "--batch-size", "0", "an integer ≥ 1"),
    ("sample", "--n", "0", "an integer ≥ 1"),
    ("bon", "--n", "0", "an integer ≥ 1"),
    ("eval", "--n", "0", "an integer ≥ 1"),
    ("sample", "--max-new-tokens", "0", "an integer ≥ 1"),
    ("eval", "--max-new-tokens", "-1", "an integer ≥ 1"),
    ("sample", "--top-p", "-0.5", "a number in (0, 1]"),
    ("sample", "--top-p", "0", "a number in (0, 1]"),
    ("bon", "--top-p", "1.5", "a number in (0, 1]"),
    ("eval", "--top-p", "nan", "a number in (0, 1]"),
    ("sample", "--temperature", "-1", "a number ≥ 0"),
    ("eval", "--judge-workers", "0", "an integer ≥ 1"),
    ("eval", "--judge-timeout", "0", "a number > 0"),
    ("eval", "--judge-timeout", "-5", "a number > 0"),
    ("eval", "--judge-retries", "-1", "an integer ≥ 0"),
    ("eval", "--judge-backoff", "-0.5", "a number ≥ 0"),
    ("eval", "--judge-max-failure-rate", "1", "a number in [0, 1)"),
    ("eval", "--judge-max-failure-rate", "-0.1", "a number in [0, 1)"),
    ("eval", "--judge-max-failure-rate", "nan", "a number in [0, 1)"),
    ("score", "--max-length", "0", "an integer ≥ 1 or none"),
    ("sample", "--max-prompt-length", "0", "an integer ≥ 1 or none"),
    ("score", "--beta", "0", "a number > 0"),
])
def test_bad_numbers_refused_by_flag_and_range(command, flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        main(_BASE[command] + [flag, value])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"directpo {command}: error: argument {flag}: must be {allowed}, got {value}"


@pytest.mark.parametrize("command", ["score", "sample", "bon", "eval"])
def test_help_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        make_parser(command).parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    assert "(default: None)" not in text
    assert "--data-split DATA_SPLIT split name for `datasets` sources (default: train) --" in text
    assert "--overwrite replace output files that exist (never an input file)" in text


def test_eval_judge_flags_checked_before_loading(pairs, capsys):
    """One judge at most; --judge-model only with --judge-url; a local judge alone is enough to run
    (and an existing output is still refused before it is loaded)."""
    base = ["eval", "--model", MISSING_MODEL, "--ref", MISSING_MODEL, "--prompts", str(pairs / "pairs.jsonl"),
            "--out", str(pairs / "r.json")]
    with pytest.raises(SystemExit) as e:
        main(base + ["--judge-url", "http://127.0.0.1:9/v1", "--judge-classifier", "c"])
    assert e.value.code == 2
    assert "argument --judge-classifier: not allowed with argument --judge-url" in capsys.readouterr().err
    assert main(base + ["--judge-reward-model", "rm", "--judge-model", "gpt"]) == 2
    assert "--judge-model names the model of --judge-url" in capsys.readouterr().err
    (pairs / "r.json").write_text("{}")
    assert main(base + ["--judge-reward-model", "rm"]) == 2
    assert "r.json exists: pass --overwrite" in capsys.readouterr().err
    # with --overwrite it goes on to load the judge's reward model: a one-line error for a missing one
    assert main(base + ["--judge-reward-model", str(pairs / "no-such-rm"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("directpo eval: error: ") and "\n" not in err and "no-such-rm" in err
    with pytest.raises(SystemExit):
        main(base + ["--reward-fn", "a:b", "--judge-order", "both"])
    assert "argument --judge-order: invalid choice: 'both'" in capsys.readouterr().err
