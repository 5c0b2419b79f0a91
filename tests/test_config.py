"""Settings: YAML values converted to each field's type, one-line errors naming the key, flags
grouped per command (each command shows only what it uses)."""
import subprocess
import sys

import pytest

from directpo.cli import main, make_parser
from directpo.config import ConfigError, build_config, convert, load_yaml
from directpo.rlhf.config import PPOConfig, RewardModelConfig
from directpo.training.config import TrainConfig


def test_yaml_values_take_the_field_type(tmp_path):
    f = tmp_path / "c.yaml"
    # YAML reads 1e-4 (no dot) as a string and "0.5" is quoted: both must become floats.
    f.write_text('lr: 1e-4\nbeta: "0.5"\nmax-steps: "12"\nprecompute_ref: "no"\nmax_length: null\nref: 7\n')
    values = load_yaml(str(f), TrainConfig)
    assert values == {"lr": 1e-4, "beta": 0.5, "max_steps": 12, "precompute_ref": False, "max_length": None,
                      "ref": "7"}
    assert all(type(values[k]) is t for k, t in [("lr", float), ("beta", float), ("max_steps", int)])


@pytest.mark.parametrize("text, key", [("beta: high\n", "beta"), ("max_steps: 2.5\n", "max_steps"),
                                       ("batch-size: [1, 2]\n", "batch-size"), ("overwrite: maybe\n", "overwrite"),
                                       ("loss: 3\nlayout: diagonal\n", "layout"), ("lr: null\n", "lr")])
def test_bad_yaml_value_is_one_line_naming_the_key(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_yaml(str(f), TrainConfig)
    msg = str(e.value)
    assert "\n" not in msg and f"{f}: {key}:" in msg


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("beta: 0.1\nlr: [1e-4\n")
    rc = main(["train", "--config", str(f), "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(f) in err and "line" in err and "Traceback" not in err


def test_flag_values_are_converted_and_checked(capsys):
    args = make_parser("train").parse_args(["train", "--lr", "2e-5", "--max-steps", "1e2"])
    assert build_config(args, TrainConfig, model="m", data="d", output_dir="o").max_steps == 100
    with pytest.raises(SystemExit):
        make_parser("train").parse_args(["train", "--max-steps", "2.5"])
    assert "expected an integer" in capsys.readouterr().err
    assert convert("None", "int | None", "k") is None


def test_each_command_shows_only_its_flags():
    def flags(command):
        return {a.dest for a in make_parser(command)._subparsers._group_actions[0].choices[command]._actions}

    rm, ppo, train = flags("rm"), flags("ppo"), flags("train")
    assert {"beta", "loss", "fsdp", "lora_r", "ref", "precompute_ref"} & rm == set()
    assert {"save_every", "resume", "keep_last", "lr", "data", "eval_data"} <= rm
    assert {"save_every", "resume", "keep_last", "kl_coef", "prompts"} <= ppo and "beta" not in ppo
    assert {"beta", "loss", "fsdp", "lora_r", "save_every"} <= train
    assert RewardModelConfig(model="m", data="d", output_dir="o").validate().lr == 1e-6
    assert PPOConfig(model="m", prompts="p", output_dir="o").validate().lr == 1e-5


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_loads_no_heavy_layer(argv):
    """`directpo --help` and `directpo train --help` import neither the benchmark, the experiments,
    the RLHF code, TRL nor matplotlib."""
    code = ("import sys, runpy\nsys.argv = ['directpo', *%r]\ntry:\n    runpy.run_module('directpo', run_name="
            "'__main__')\nexcept SystemExit:\n    pass\nbad = [m for m in sys.modules if m.split('.')[0] in "
            "('trl', 'matplotlib') or m.startswith(('directpo.bench', 'directpo.experiments', 'directpo.rlhf'))]\n"
            "print('LOADED', sorted(bad))\n" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "LOADED []" in out, out[-2000:]


def test_a_batch_not_divisible_by_the_micro_batch_names_both_flags_and_a_fix():
    """Before: "batch_size (2) must be a multiple of micro_batch_size (8)", for `--batch-size 2` alone:
    field names, and a micro-batch size the user never gave (the default)."""
    from directpo.training.plan import PlanConfig

    for cls, required in ((TrainConfig, {"data": "d", "output_dir": "o"}), (PlanConfig, {})):
        with pytest.raises(ConfigError) as e:
            cls(model="m", batch_size=2, **required).validate()
        assert str(e.value) == ("--batch-size 2 must be a multiple of --micro-batch-size 8 (examples per "
                                "forward/backward); pass --micro-batch-size 2, or another divisor of 2")
        with pytest.raises(ConfigError, match="pass --micro-batch-size 1, or another divisor of 3"):
            cls(model="m", batch_size=3, micro_batch_size=2, **required).validate()
