"""`--reward-fn module:function`: the current directory is searched last and only for that import."""
import importlib
import sys

import pytest

from directpo.eval.scorers import load_callable, load_reward_fn


def test_reward_fn_from_cwd_does_not_shadow_installed_modules(tmp_path, monkeypatch):
    # A local folder named like a stdlib module not imported yet (and one like json, which is)
    for name in ("colorsys", "json"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("FAKE = True\n")
    (tmp_path / "rewards_here.py").write_text(
        "import colorsys\n\ndef fn(prompt, completion):\n    return 1.0 if hasattr(colorsys, 'FAKE') else 0.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # imported afresh, through sys.path
    path_before = list(sys.path)
    try:
        fn = load_callable("rewards_here:fn")
        assert fn("p", "c") == 0.0  # the real colorsys, not ./colorsys
        assert sys.path == path_before  # the current directory was there for that import only
        assert not hasattr(importlib.import_module("colorsys"), "FAKE")
        assert not hasattr(importlib.import_module("json"), "FAKE")
        import rewards_here  # stays importable: already imported
        assert rewards_here.fn is fn
        assert load_reward_fn(reward_fn="rewards_here:fn")(["p"], ["c"]) == [0.0]
    finally:
        for name in ("rewards_here", "colorsys"):
            sys.modules.pop(name, None)
    assert sys.path == path_before


def test_reward_fn_errors_restore_sys_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    with pytest.raises(ValueError, match="cannot import module 'no_such_rewards'"):
        load_callable("no_such_rewards:fn")
    assert sys.path == path_before


@pytest.mark.parametrize("value, said", [(1.0, "returned 1.0, expected a list of 2 numbers"),
                                         (None, "returned None, expected a list of 2 numbers")])
def test_a_batched_reward_fn_returning_no_list_is_named(value, said):
    """A `batched` callable returning one number (or nothing) was a TypeError traceback ('float object
    is not iterable', reported as directpo's bug); now one line naming the function."""
    from directpo.errors import UserError
    from directpo.eval.scorers import callable_scorer

    def mean_reward(prompts, completions):
        return value
    mean_reward.batched = True
    with pytest.raises(UserError, match=f"reward function .*mean_reward: {said}"):
        callable_scorer(mean_reward)(["p", "q"], ["a", "b"])
