"""User mistakes are one line (exit 2); directpo's own bugs a traceback and a please-report line
(exit 1); Ctrl-C a line without "error" (exit 130). `directpo.errors.UserError` tells them apart."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import directpo
from directpo.cli import bug_report_line, is_user_error, main, report_line
from directpo.errors import MissingPackageError, UserError, UserValueError

SRC = str(Path(directpo.__file__).resolve().parents[1])

# A command whose `run` raises what `DIRECTPO_TEST_RAISE` names: the CLI's handling, alone.
_FAKE = '''
import os, sys, types
import directpo.cli as cli

def register(name, parser):
    parser.set_defaults(func=run)

def run(args):
    from directpo.errors import UserValueError
    from directpo.training.run import Interrupted
    what = os.environ["DIRECTPO_TEST_RAISE"]
    if what == "bug":
        raise ValueError("an internal invariant broke")
    if what == "user":
        raise UserValueError("--temperature -1: must be >= 0")
    if what == "oserror":
        raise FileNotFoundError("data.jsonl: no such file")
    if what == "interrupted":
        raise Interrupted("interrupted at step 3/40; checkpoint saved in out/checkpoints/step-00000003; "
                          "resume with --resume")
    return 0

fake = types.ModuleType("directpo.cli._fake")
fake.register, fake.run = register, run
sys.modules["directpo.cli._fake"] = fake
cli.COMMANDS["boom"] = ("_fake", "raises what DIRECTPO_TEST_RAISE names")
'''


def _boom(what: str, *flags: str) -> subprocess.CompletedProcess:
    code = _FAKE + f"\nsys.exit(cli.main(['boom', *{list(flags)!r}]))\n"
    env = {**os.environ, "DIRECTPO_TEST_RAISE": what, "PYTHONPATH": SRC}
    env.pop("DIRECTPO_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_an_internal_value_error_prints_its_traceback_and_asks_for_a_report():
    r = _boom("bug")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):", r.stderr
    assert "ValueError: an internal invariant broke" in r.stderr
    assert lines[-1] == bug_report_line()
    assert lines[-1].startswith(f"directpo: this is a bug in directpo {directpo.__version__}, not a mistake in "
                                "your input; please report it")
    assert "boom: error:" not in r.stderr


def test_a_user_mistake_is_one_line_and_exit_2():
    r = _boom("user")
    assert (r.returncode, r.stderr) == (2, "directpo boom: error: --temperature -1: must be >= 0\n")


def test_a_missing_file_is_one_line_and_exit_2():
    r = _boom("oserror")
    assert (r.returncode, r.stderr) == (2, "directpo boom: error: data.jsonl: no such file\n")


def test_ctrl_c_line_says_interrupted_not_error_and_exits_130():
    r = _boom("interrupted")
    assert r.returncode == 130, r.stderr
    assert r.stderr == ("directpo boom: interrupted at step 3/40; checkpoint saved in out/checkpoints/step-00000003; "
                        "resume with --resume\n")
    assert "error" not in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_a_user_mistake_s_traceback_without_the_report_line():
    r = _boom("user", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserValueError: --temperature" in r.stderr
    assert bug_report_line() not in r.stderr


@pytest.fixture
def boom(monkeypatch):
    """The fake command, in this process: `boom(exc)` makes `directpo boom` raise `exc`."""
    raised = {}

    def register(name, parser):
        parser.set_defaults(func=namespace["run"])

    # compiled as directpo's own code would be: not a file of the user's
    namespace = {"raised": raised}
    exec(compile("def run(args):\n    raise raised['exc']\n", "<directpo fake command>", "exec"), namespace)
    module = types.ModuleType("directpo.cli._fake")
    module.register = register
    monkeypatch.setitem(sys.modules, "directpo.cli._fake", module)
    monkeypatch.setitem(__import__("directpo.cli").cli.COMMANDS, "boom", ("_fake", "test"))
    monkeypatch.delenv("DIRECTPO_DEBUG", raising=False)

    def arm(exc):
        raised["exc"] = exc
    return arm


def test_in_process_callers_get_the_bug_itself_with_the_report_note(boom):
    """`main()` called from Python (tests, scripts) still raises the bug; the note rides on it, once
    however many times it passes through `main`."""
    bug = KeyError("oops")
    boom(bug)
    for _ in range(2):
        with pytest.raises(KeyError) as e:
            main(["boom"])
        assert e.value is bug and e.value.__notes__ == [bug_report_line()]


def test_an_error_in_the_user_s_own_code_is_not_called_a_bug_in_directpo(tmp_path, monkeypatch):
    """A --reward-fn module that raises: the note names the user's file and line, not a directpo bug."""
    (tmp_path / "my_rewards.py").write_text("def score(prompt, completion):\n    return int('not a number')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    from directpo.eval.scorers import load_reward_fn

    scorer = load_reward_fn(reward_fn="my_rewards:score")
    with pytest.raises(ValueError) as e:
        scorer(["p"], ["c"])
    note = report_line(e.value)
    assert note.startswith("directpo: the error above rose in your own code (")
    assert "my_rewards.py, line 2), called by directpo" in note and "bug in directpo" not in note


def test_in_process_user_mistake_returns_its_exit_code(boom, capsys):
    boom(UserValueError("--lr 0: must be > 0"))
    assert main(["boom"]) == 2
    assert capsys.readouterr().err == "directpo boom: error: --lr 0: must be > 0\n"


def _user_error_classes():
    from directpo.bench.procfs import MeasureError
    from directpo.config import ConfigError
    from directpo.data.formats import DataError
    from directpo.diskio import DiskWriteError
    from directpo.eval.judge import JudgeError
    from directpo.outputs import OutputDirError, RunLockedError
    from directpo.precision import PrecisionError
    from directpo.training.checkpoint import CheckpointError
    from directpo.training.budget import MemoryBudgetError
    from directpo.training.run import Interrupted, ModelDiedError
    from directpo.training.step import BrokenWeightsError, DivergenceError, NonFiniteError
    return {DataError: ValueError, ConfigError: ValueError, MemoryBudgetError: ValueError,
            OutputDirError: ValueError, CheckpointError: ValueError, PrecisionError: ValueError,
            JudgeError: ValueError, UserValueError: ValueError, RunLockedError: OSError, DiskWriteError: OSError,
            NonFiniteError: RuntimeError, DivergenceError: RuntimeError, BrokenWeightsError: RuntimeError,
            ModelDiedError: RuntimeError, Interrupted: RuntimeError, MeasureError: RuntimeError,
            MissingPackageError: ImportError}


def test_every_user_error_class_is_a_user_error_and_keeps_its_builtin_base():
    for cls, base in _user_error_classes().items():
        assert issubclass(cls, UserError) and issubclass(cls, base), cls


def test_what_counts_as_a_user_mistake():
    assert is_user_error(UserValueError("x")) and is_user_error(FileNotFoundError("x"))
    assert is_user_error(PermissionError("x")) and is_user_error(MissingPackageError("x"))
    assert not is_user_error(ValueError("x")) and not is_user_error(TypeError("x"))
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))

    class Marked(RuntimeError):
        user_error = True
    assert is_user_error(Marked("x"))  # the older marker still counts
