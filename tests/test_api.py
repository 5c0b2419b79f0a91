"""The Python API (`directpo.api`, exported by `directpo`): the same jobs as the commands, on the
same settings, with results, callbacks and in-memory models."""
import json

import pytest

import directpo
from directpo import api
from directpo.cli import main
from directpo.toy import review_task, write_jsonl

TIMINGS = ("pairs_per_s", "tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, held = review_task(n_train=16, n_eval=4, seed=4)
    d = tmp_path_factory.mktemp("api")
    return write_jsonl(rows, d / "train.jsonl"), write_jsonl(held, d / "eval.jsonl")


def _settings(model, data, out, **extra):
    return {**dict(model=str(model), data=str(data[0]), eval_data=str(data[1]), output_dir=str(out), batch_size=4,
                   micro_batch_size=4, max_steps=3, warmup_steps=0, max_length=64, lr=1e-3, optimizer="adamw",
                   progress=False, threads=1), **extra}


def _no_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_api_and_cli_give_the_same_metrics_lines(tiny_model, data, tmp_path, capsys):
    result = directpo.train(**_settings(tiny_model, data, tmp_path / "api"))
    argv = ["train"]
    for k, v in _settings(tiny_model, data, tmp_path / "cli").items():
        argv += [f"--{k.replace('_', '-')}", str(v)] if not isinstance(v, bool) else [f"--{'' if v else 'no-'}"
                                                                                      f"{k.replace('_', '-')}"]
    assert main(argv) == 0
    cli_records = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert _no_timings(result.metrics) == _no_timings(cli_records)
    assert result.train["step"] == 3 and result.eval["step"] == 3 and result.output_dir == tmp_path / "api"
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _no_timings([printed["train"]]) == _no_timings([result.train])
    assert result.load_model().config.vocab_size > 0


def test_settings_object_and_keywords(tiny_model, data, tmp_path):
    cfg = directpo.TrainConfig(**_settings(tiny_model, data, tmp_path / "a"))
    result = directpo.sft(cfg, max_steps=2, eval_data=None)  # keywords override the object's fields
    assert result.train["step"] == 2 and result.eval is None
    assert json.loads((tmp_path / "a" / "directpo_config.json").read_text())["loss"] == "sft"
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        directpo.train(cfg, lr=float("inf"))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        directpo.train(object())


def test_callbacks_see_steps_and_stop_early(tiny_model, data, tmp_path):
    seen = []

    class Stop(directpo.Callback):
        def on_step(self, record):
            seen.append(record["step"])
            return record["step"] == 2

        def on_eval(self, record):
            seen.append(("eval", record["step"]))

    result = directpo.train(**_settings(tiny_model, data, tmp_path / "o", max_steps=10), callbacks=[Stop()])
    assert result.stopped_at == 2 and seen == [("eval", 0), 1, 2]
    assert (tmp_path / "o" / "run_complete.json").exists() and (tmp_path / "o" / "model.safetensors").exists()


def test_model_objects_train_in_memory(tiny_model, data, tmp_path):
    """A model and tokenizer the user holds: trained without writing them anywhere first; the run
    is the same as from the folder they came from."""
    from transformers import AutoModelForCausalLM

    from directpo.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = load_tokenizer(str(tiny_model))
    settings = _settings(tiny_model, data, tmp_path / "obj")
    settings["model"] = model
    from_object = directpo.train(tokenizer=tokenizer, **settings)
    from_folder = directpo.train(**_settings(tiny_model, data, tmp_path / "dir"))
    assert _no_timings(from_object.metrics) == _no_timings(from_folder.metrics)
    recorded = json.loads((tmp_path / "obj" / "directpo_config.json").read_text())
    assert recorded["model"] == str(tiny_model)  # its name_or_path
    with pytest.raises(ValueError, match="needs its tokenizer"):
        directpo.train(**{**settings, "output_dir": str(tmp_path / "x")})


def test_in_memory_rows_train_like_the_file(tiny_model, data, tmp_path):
    """A list of dicts (or a `datasets.Dataset`) trains exactly as the same rows in a JSONL file;
    a bad row is named by its number."""
    import datasets

    rows = [json.loads(x) for x in data[0].read_text().splitlines()]
    held = [json.loads(x) for x in data[1].read_text().splitlines()]
    from_file = directpo.train(**_settings(tiny_model, data, tmp_path / "file"))
    from_rows = directpo.train(**{**_settings(tiny_model, data, tmp_path / "rows"), "data": rows,
                                  "eval_data": datasets.Dataset.from_list(held)})
    assert _no_timings(from_rows.metrics) == _no_timings(from_file.metrics)
    assert json.loads((tmp_path / "rows" / "directpo_config.json").read_text())["data"] == "in-memory data"
    bad = rows[:3] + [{"prompt": "p", "chosen": 3, "rejected": "r"}]
    with pytest.raises(ValueError, match="in-memory data, row 4, field 'chosen'"):
        directpo.train(**{**_settings(tiny_model, data, tmp_path / "bad"), "data": bad})


def test_a_setting_of_the_wrong_type_is_a_config_error_naming_it(tmp_path):
    """Before: beta="high" failed deep in the loss ("only integer tensors of a single element can be
    converted to an index"), plan(batch_size="8") in a format string: TypeErrors, no setting named.
    Numbers given as text are read as a config file's are."""
    import directpo
    from directpo.config import ConfigError
    from directpo.training import TrainConfig

    with pytest.raises(ConfigError, match="beta: expected a number, got 'high'"):
        directpo.train(model="m", data="d.jsonl", output_dir=str(tmp_path / "o"), beta="high")
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got 8.5"):
        directpo.plan(model="m", batch_size=8.5)
    with pytest.raises(ConfigError, match="progress: expected true or false, got 'maybe'"):
        directpo.train(TrainConfig(model="m", data="d.jsonl", output_dir="o", progress="maybe"))
    from directpo.api import _settings

    assert _settings(TrainConfig, None, {"lr": "1e-6", "max_steps": "2"}).lr == 1e-6
