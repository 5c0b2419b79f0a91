"""One settings path (#28): every command's flags are the fields of its settings dataclass, so each
takes `--config FILE.yaml`, converts and range-checks its values the same way, and keeps the flag
names, defaults and negations scripts use."""
import argparse
import json
from dataclasses import dataclass, fields

import pytest

from directpo.bench.config import BenchConfig
from directpo.cli import COMMANDS, main, make_parser
from directpo.config import (ConfigError, _base_type, add_flags, build_config, convert, field_types, flag_name,
                             load_yaml, setting)
from directpo.eval.config import BonConfig, EvalConfig, PlotConfig, SampleConfig, ScoreConfig
from directpo.rlhf.online import OnlineConfig
from directpo.experiments.sentiment import SentimentConfig
from directpo.experiments.winrate.config import DialogueConfig, SummarizeConfig
from directpo.inspect.config import InspectConfig
from directpo.rlhf.config import PPOConfig, RewardModelConfig
from directpo.toy import review_task, write_jsonl
from directpo.experiments.demo import DemoConfig
from directpo.training.config import PipelineConfig, TrainConfig
from directpo.training.optim import OPTIMIZERS
from directpo.training.merge import MergeConfig
from directpo.training.plan import PlanConfig

SETTINGS = {"train": TrainConfig, "sft": TrainConfig, "pipeline": PipelineConfig, "inspect": InspectConfig,
            "score": ScoreConfig, "sample": SampleConfig, "bon": BonConfig, "eval": EvalConfig, "plan": PlanConfig,
            "merge": MergeConfig, "plot": PlotConfig, "rm": RewardModelConfig, "ppo": PPOConfig, "online": OnlineConfig,
            "bench": BenchConfig, "demo": DemoConfig,
            "experiment": {"sentiment": SentimentConfig, "dialogue": DialogueConfig, "summarize": SummarizeConfig}}
# Flags that are no field of a settings dataclass, each with why. Nothing else may be declared by hand.
NOT_SETTINGS: dict[str, set[str]] = {}
ALWAYS = {"-h", "--help", "--config"}


def _command_parser(command: str) -> argparse.ArgumentParser:
    return make_parser(command)._subparsers._group_actions[0].choices[command]


def _parsers():
    """(name, parser, settings class) of every command, each `experiment` study on its own."""
    for command in COMMANDS:
        parser = _command_parser(command)
        cls = SETTINGS.get(command)
        if isinstance(cls, dict):
            for study, study_parser in parser._subparsers._group_actions[0].choices.items():
                yield f"{command} {study}", study_parser, cls[study]
        else:
            yield command, parser, cls


def test_every_flag_is_a_field_of_the_command_settings():
    assert set(COMMANDS) == set(SETTINGS), "a new command: list its settings dataclass here"
    top = {s for a in make_parser()._actions for s in a.option_strings}
    assert top == {"-h", "--help", "--version", "--debug"}
    for name, parser, cls in _parsers():
        hand_written = NOT_SETTINGS.get(name, set())
        names = {f.name for f in fields(cls)} if cls else set()
        seen = set()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            strings = set(action.option_strings) or {action.dest}
            if strings & (ALWAYS | hand_written):
                assert strings <= ALWAYS | hand_written, (name, strings)
                continue
            assert action.dest in names, f"{name}: {sorted(strings)} is not a field of {cls.__name__}"
            for s in action.option_strings:  # --field-name, or --no-field-name of a bool
                assert s in (flag_name(action.dest), "--no-" + flag_name(action.dest)[2:]), (name, s)
            seen.add(action.dest)
        assert seen == names, f"{name}: fields without a flag: {sorted(names - seen)}"


def test_every_command_reads_a_yaml_config():
    for name, parser, cls in _parsers():
        if cls is not None:
            assert "--config" in parser._option_string_actions, name


def test_field_types_are_read_with_get_type_hints():
    class Hint(str):
        """A type whose name holds 'int': the old substring test took it for an integer."""

    @dataclass
    class Settings:
        label: Hint = setting("x", "a label")
        points: int | None = setting(None, "points")
        temps: list[float] | None = setting(None, "temperatures")

    types = field_types(Settings)
    assert types["points"] == int | None
    assert _base_type(types["label"]) == ("str", False)
    assert _base_type(types["points"]) == ("int", True) == _base_type("int | None")
    assert _base_type(types["temps"]) == ("list", True)
    assert convert("12", Hint, "k") == "12" and convert("none", "int | None", "k") is None
    assert convert([0.5, "1"], "list[float] | None", "k") == [0.5, 1.0]
    with pytest.raises(ConfigError, match="k: expected a number"):
        convert(["a"], "list[float]", "k")


def test_choices_are_the_registries():
    from directpo.data.collate import LAYOUTS
    from directpo.eval import config as eval_config
    from directpo.eval.judge import ORDERS
    from directpo.precision import PRECISIONS

    def choices(cls, name):
        return next(f for f in fields(cls) if f.name == name).metadata["choices"]

    assert choices(BenchConfig, "optimizer") == list(OPTIMIZERS)
    assert (eval_config.PRECISIONS, eval_config.LAYOUTS) == (PRECISIONS, LAYOUTS)  # copies that load no torch
    assert choices(ScoreConfig, "precision") == choices(EvalConfig, "precision") == choices(InspectConfig, "precision") \
        == list(PRECISIONS)
    assert choices(ScoreConfig, "layout") == list(LAYOUTS) and choices(EvalConfig, "judge_order") == list(ORDERS)


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_flags_and_defaults(tmp_path):
    cfg_file = _yaml(tmp_path, "model: m\nref: r\nprompts: p\nout: o.json\nreward-fn: a:b\nn: 3\n"
                               "temperatures: [0.5, 1]\ntop_p: '0.9'\nprogress: false\n")
    args = make_parser("eval").parse_args(["eval", "--config", cfg_file, "--n", "4", "--max-prompt-length", "none"])
    cfg = build_config(args, EvalConfig).validate()
    assert (cfg.model, cfg.ref, cfg.n, cfg.top_p, cfg.progress, cfg.max_prompt_length) == ("m", "r", 4, 0.9, False,
                                                                                          None)
    assert cfg.sweep() == [0.5, 1.0] and cfg.batch_size == 16 and cfg.judge_order == "swap"
    args = make_parser("eval").parse_args(["eval", "--config", cfg_file, "--temperatures", "0.25,0.75"])
    assert build_config(args, EvalConfig).sweep() == [0.25, 0.75]
    assert build_config(make_parser("eval").parse_args(["eval", "--config", _yaml(tmp_path, "temperature: 0.3\n")]),
                        EvalConfig).sweep() == [0.3]


@pytest.mark.parametrize("cls, text, says", [
    (EvalConfig, "model: m\nref: r\nprompts: p\nout: o\nn: 0\n", "--n must be ≥ 1"),
    (EvalConfig, "model: m\nref: r\nprompts: p\nout: o\njudge_max_failure_rate: 1\n",
     "--judge-max-failure-rate must be ≥ 0 and < 1"),
    (SampleConfig, "model: m\nprompts: p\nout: o\ntop_p: 0\n", "--top-p must be > 0 and ≤ 1"),
    (ScoreConfig, "model: m\ndata: d\nout: o\nmax_length: 0\n", "--max-length must be ≥ 1"),
    (InspectConfig, "data: d\nmodel: m\nmax_length: 1\n", "--max-length must be ≥ 2"),
    (BenchConfig, "model: m\ndata: d\nthreads: -1\n", "--threads must be ≥ 0"),
    (SampleConfig, "model: m\nout: o\n", "missing required setting(s): --prompts"),
    (BonConfig, "model: m\nprompts: p\nout: o\nn: 2\n", "one of the arguments --reward-model --reward-fn is required"),
    (BonConfig, "model: m\nprompts: p\nout: o\nn: 2\nreward_fn: a:b\nreward_model: rm\n",
     "--reward-model and --reward-fn exclude each other"),
    (EvalConfig, "model: m\nref: r\nprompts: p\nout: o\njudge_url: u\njudge_classifier: c\n",
     "--judge-url and --judge-classifier exclude each other"),
    (InspectConfig, "data: d\n", "give --model (the reference: its tokenizer and log-probs) or --tokenizer"),
    (BenchConfig, "model: m\ndata: d\nplan_check: true\nfsdp_memory: true\n", "two separate measurements"),
])
def test_yaml_values_are_checked_like_flags(tmp_path, cls, text, says):
    command = {EvalConfig: "eval", SampleConfig: "sample", ScoreConfig: "score", InspectConfig: "inspect",
               BenchConfig: "bench", BonConfig: "bon"}[cls]
    args = make_parser(command).parse_args([command, "--config", _yaml(tmp_path, text)])
    with pytest.raises(ConfigError) as e:
        build_config(args, cls).validate()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_yaml_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="temperatures: expected temperatures ≥ 0"):
        load_yaml(_yaml(tmp_path, "temperatures: -1,0.5\n"), EvalConfig)
    with pytest.raises(ConfigError, match="judge_order: 'both' is not one of swap, random"):
        load_yaml(_yaml(tmp_path, "judge_order: both\n"), EvalConfig)
    with pytest.raises(ConfigError, match="unknown setting 'betta'"):
        load_yaml(_yaml(tmp_path, "betta: 1\n"), ScoreConfig)


@pytest.mark.parametrize("command, argv, field, value", [
    ("sample", ["--no-progress"], "progress", False),
    ("sample", ["--progress"], "progress", True),
    ("eval", ["--overwrite"], "overwrite", True),
    ("eval", ["--no-overwrite"], "overwrite", False),
    ("inspect", ["--json"], "json", True),
    ("inspect", ["--no-progress"], "progress", False),
    ("plot", ["run", "--overwrite"], "overwrite", True),
    ("bench", ["--keep-work", "--plan-check"], "keep_work", True),
    ("bench", ["--fsdp-memory"], "fsdp_memory", True),
])
def test_switches_keep_their_names(command, argv, field, value):
    assert getattr(make_parser(command).parse_args([command, *argv]), field) is value


def test_switch_help_shows_the_flag_scripts_use(capsys):
    text = _command_parser("sample").format_help()
    assert "--no-progress         no progress bar" in text and "--progress" not in text.replace("--no-progress", "")
    assert "--no-overwrite" not in text


def test_every_help_renders(capsys):
    """`--help` of every command and study prints (a bare `%` in a help text once made it a traceback),
    with each setting's help as written: a percent sign stays one."""
    for name, parser, _ in _parsers():
        text = parser.format_help()
        assert "usage:" in text, name
    text = " ".join(_command_parser("experiment")._subparsers._group_actions[0].choices["sentiment"]
                    .format_help().split())
    assert "95 % prediction interval" in text
    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "sentiment", "--help"])
    assert exit_.value.code == 0 and "--check-seeds" in capsys.readouterr().out


def test_defaults_unchanged():
    defaults = {"score": dict(beta=0.1, max_length=512, max_prompt_length=None, batch_size=8, on_invalid="error",
                              precision="auto", layout="packed", overwrite=False),
                "sample": dict(n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, seed=0, batch_size=16,
                               max_prompt_length=None, on_invalid="error", progress=True, overwrite=False),
                "eval": dict(n=1, temperatures=None, judge_prompt="dialogue", judge_order="swap", judge_workers=4,
                             judge_timeout=60.0, judge_retries=3, judge_backoff=1.0, judge_max_failure_rate=0.1,
                             precision="auto"),
                "inspect": dict(max_length=512, max_prompt_length=None, batch_size=8, threads=0, precision="fp32",
                                json=False, progress=True),
                "bench": dict(batch=8, micro_batch=0, max_length=512, steps=10, rounds=2, systems="directpo,trl",
                              threads=0, optimizer="rmsprop", lora_r=0, allocator="both", nproc=2,
                              checkpoint_format="sharded", plan_check=False, fsdp_memory=False, keep_work=False)}
    classes = {"score": ScoreConfig, "sample": SampleConfig, "eval": EvalConfig, "inspect": InspectConfig,
               "bench": BenchConfig}
    for command, expected in defaults.items():
        cfg = build_config(make_parser(command).parse_args([command]), classes[command])
        assert {k: getattr(cfg, k) for k in expected} == expected, command


def test_exclusive_flags_refused_as_they_are_read(capsys):
    with pytest.raises(SystemExit):
        make_parser("bon").parse_args(["bon", "--reward-fn", "a:b", "--reward-model", "rm"])
    assert "argument --reward-model: not allowed with argument --reward-fn" in capsys.readouterr().err


def test_add_flags_checks_ranges_early_only_when_asked(capsys):
    @dataclass
    class S:
        k: int = setting(1, "k", ge=1)

    for early in (False, True):
        p = argparse.ArgumentParser()
        add_flags(p, S, check_ranges_early=early)
        if not early:
            assert p.parse_args(["--k", "0"]).k == 0  # checked later, by check_ranges (with the YAML's values)
            continue
        with pytest.raises(SystemExit):
            p.parse_args(["--k", "0"])
        assert "argument --k: must be an integer ≥ 1, got 0" in capsys.readouterr().err


def test_bench_measures_with_its_settings(monkeypatch, tmp_path, capsys):
    """`run_bench` (and the memory checks) get the BenchConfig, YAML and flags merged."""
    import directpo.bench

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"table": "T", "results": [{"pairs_per_s": 1.0}], "vocab_sweep": []}

    monkeypatch.setattr(directpo.bench, "run_bench", fake)
    assert main(["bench", "--config", _yaml(tmp_path, "model: m\ndata: d\nsteps: 3\nlora_r: 4\n"), "--steps", "5"]) == 0
    (cfg,) = seen
    assert isinstance(cfg, BenchConfig) and (cfg.model, cfg.steps, cfg.lora_r, cfg.batch) == ("m", 5, 4, 8)
    assert capsys.readouterr().out.strip() == "T"


def test_eval_runs_from_a_yaml_config(tiny_model, tmp_path, monkeypatch, capsys):
    rows, _ = review_task(n_train=3, n_eval=1, seed=2)
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.yaml").write_text(
        f"model: {tiny_model}\nref: {tiny_model}\nprompts: pairs.jsonl\nout: res.json\n"
        "reward_fn: directpo.eval.scorers:review_sentiment\nmax_new_tokens: 4\ntemperatures: 0.5,1.0\n"
        "progress: false\ndevice: cpu\n")
    assert main(["eval", "--config", "eval.yaml", "--samples-out", "s.jsonl"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == "res.json" and summary["samples_out"] == "s.jsonl" and "reward_mean" in summary
    res = json.loads((tmp_path / "res.json").read_text())
    assert [e["temperature"] for e in res["temperatures"]] == [0.5, 1.0]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2 * 3  # 2 temperatures × 3 prompts × n=1
    # the YAML's output exists now: refused without --overwrite, like the flag
    assert main(["eval", "--config", "eval.yaml"]) == 2
    assert "res.json exists: pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("command, argv, says", [
    ("inspect", ["--max-length", "1"], "argument --max-length: must be an integer ≥ 2 or none, got 1"),
    ("inspect", ["--threads", "-1"], "argument --threads: must be an integer ≥ 0, got -1"),
    ("eval", ["--temperatures", "0.5,x"], ("argument --temperatures: expected comma-separated numbers, e.g. "
                                           "0.25,0.5,0.75,1.0; got '0.5,x'")),
    ("eval", ["--temperatures", "0.5,-1"], "argument --temperatures: expected temperatures ≥ 0, got '0.5,-1'"),
    ("sample", ["--temperature", "inf"], "argument --temperature: must be a number ≥ 0, got inf"),
])
def test_bad_flags_are_usage_errors_as_before(command, argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        make_parser(command).parse_args([command, *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_resumable_settings_are_declared_on_their_fields():
    from directpo.rlhf.config import PPOConfig as PPO

    resumable = TrainConfig.RESUMABLE_CHANGES
    assert {"max_steps", "save_every", "threads", "memory_budget", "resume_from_last_good"} <= resumable
    assert not {"lr", "beta", "seed", "loss", "data", "model", "batch_size"} & resumable  # they change the run
    assert resumable == {f.name for f in fields(TrainConfig) if f.metadata.get("resumable")}
    assert "snapshot_every" in PPO.RESUMABLE_CHANGES and "snapshot_every" not in resumable


def test_prompt_length_not_below_max_length_names_the_flags(tmp_path, capsys):
    argv = ["--max-length", "8", "--max-prompt-length", "8"]
    assert main(["train", "--model", "m", "--data", "d.jsonl", "--output-dir", str(tmp_path / "o"), *argv]) == 2
    assert "--max-prompt-length 8 must be smaller than --max-length 8" in capsys.readouterr().err
