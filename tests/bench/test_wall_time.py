"""`directpo bench --wall-time --before REV`: two trees' whole commands, alternating, in one run.

Most tests run the bench against a throwaway git repository of two commits whose `directpo`
package is a stand-in (`python -m directpo` records which commit ran which command and writes the
stage records the real commands write), with the bench's idea of "this checkout" pointed at it; one
runs the real `directpo online` of this checkout on the tiny model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from directpo.bench import trees, wall_time
from directpo.cli import main
from directpo.toy import review_task, write_jsonl

FAKE_MAIN = """\
import json, os, sys, time
from pathlib import Path
VERSION = {version!r}
argv = sys.argv[1:]
with open(os.environ["WALL_TEST_LOG"], "a") as f:
    f.write(json.dumps({{"version": VERSION, "command": argv[0], "file": os.path.realpath(__file__),
                         "cwd": os.getcwd()}}) + "\\n")
if VERSION in os.environ.get("WALL_TEST_FAIL", ""):
    print("boom: this tree fails")
    sys.exit(3)
out = Path(argv[argv.index("--output-dir") + 1])
time.sleep({sleep})
if argv[0] == "online":
    for r, name in ((0, "eval"), (1, "pairs"), (1, "train"), (1, "eval")):
        (out / f"round-{{r}}").mkdir(parents=True, exist_ok=True)
        (out / f"round-{{r}}" / f"{{name}}.done.json").write_text(json.dumps({{"seconds": 0.01}}))
else:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({{"timings_s": {{"preference pairs": 0.01, "Best-of-N": 0.02}}}}))
"""


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _commit_fake(repo: Path, version: str, sleep: float) -> str:
    pkg = repo / "src" / "directpo"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (pkg / "__main__.py").write_text(FAKE_MAIN.format(version=version, sleep=sleep))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", version)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A git repository of two commits (old, new) standing in for this checkout, and the log its
    stand-in commands append to."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    old = _commit_fake(repo, "old", 0.05)
    new = _commit_fake(repo, "new", 0.0)
    monkeypatch.setattr(trees, "package_src", lambda: repo / "src")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("WALL_TEST_LOG", str(log))
    return {"repo": repo, "old": old, "new": new, "log": log}


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _worktrees(repo: Path) -> list[str]:
    return [line for line in _git(repo, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_jsonl(review_task(n_train=40, n_eval=1)[0], tmp_path / "pairs.jsonl")


def test_both_trees_alternate_and_the_worktree_goes_away(fake_repo, prompts, tmp_path, tiny_model, capsys):
    out = tmp_path / "wall.json"
    rc = main(["bench", "--wall-time", "--before", fake_repo["old"][:8], "--model", str(tiny_model), "--data",
               str(prompts), "--rounds", "2", "--out", str(out)])
    assert rc == 0
    calls = _calls(fake_repo["log"])
    # the import check of each tree, then per round: online then sentiment-stage, each on both trees,
    # the first tree swapping each round
    runs = [(c["command"], c["version"]) for c in calls]
    assert runs == [("online", "old"), ("online", "new"), ("experiment", "old"),
                    ("experiment", "new"), ("online", "new"), ("online", "old"), ("experiment", "new"),
                    ("experiment", "old")]
    old_files = {c["file"] for c in calls if c["version"] == "old"}
    assert len(old_files) == 1 and not next(iter(old_files)).startswith(str(fake_repo["repo"]))
    assert {c["cwd"] for c in calls} == {str(fake_repo["repo"])}
    assert _worktrees(fake_repo["repo"]) == [f"worktree {fake_repo['repo']}"]
    assert not Path(next(iter(old_files))).exists()  # the worktree's files are gone with it

    r = json.loads(out.read_text())
    assert r["settings"]["online_prompts"] == wall_time.ONLINE_PROMPTS
    assert r["revisions"]["before"] == {"rev": fake_repo["old"][:8], "commit": fake_repo["old"], "dirty": False}
    assert r["revisions"]["after"]["commit"] == fake_repo["new"]
    assert len(r["runs"]) == 8 and all("error" not in x for x in r["runs"])
    assert [x["tree"] for x in r["runs"] if x["command"] == "online"] == ["before", "after", "after", "before"]
    for row in r["results"]:
        assert row["before"]["rounds_ok"] == row["after"]["rounds_ok"] == 2
        assert row["ratio"] == pytest.approx(row["before"]["wall_s"] / row["after"]["wall_s"])
        walls = [x["wall_s"] for x in r["runs"] if x["command"] == row["command"] and x["tree"] == "before"]
        assert row["before"]["wall_s"] == pytest.approx(sum(walls) / 2)  # the median of two
        assert row["before"]["peak_rss_mib"] > 1 and row["before"]["cpu_s"] > 0
    online = r["results"][0]
    assert set(online["after"]["phases"]) == {"sample+pair", "train", "evaluate", "other"}
    assert online["after"]["phases"]["evaluate"] == pytest.approx(0.02)
    assert set(r["results"][1]["after"]["phases"]) == {"preference pairs", "Best-of-N", "other"}
    # the old tree sleeps 50 ms more per command: the median shows it
    assert online["before"]["wall_s"] > online["after"]["wall_s"]
    table = (tmp_path / "wall.md").read_text()
    assert "| command | before s | after s | before/after |" in table
    assert "| online | sample+pair |" in table and "| sentiment-stage | Best-of-N |" in table
    assert table.strip() in capsys.readouterr().out


def test_a_failing_command_is_reported_and_the_worktree_still_goes(fake_repo, prompts, tmp_path, tiny_model,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("WALL_TEST_FAIL", "old")
    out = tmp_path / "wall.json"
    rc = main(["bench", "--wall-time", "--before", fake_repo["old"], "--model", str(tiny_model), "--data",
               str(prompts), "--rounds", "1", "--wall-commands", "online", "--wall-scale", "0.25", "--out", str(out)])
    assert rc == 1
    r = json.loads(out.read_text())
    assert r["settings"]["online_prompts"] == wall_time.ONLINE_PROMPTS // 4
    failed = [x for x in r["runs"] if "error" in x]
    assert [x["tree"] for x in failed] == ["before"]
    assert failed[0]["exit_status"] == 3 and "boom: this tree fails" in failed[0]["log_tail"]
    assert r["results"][0]["before"]["rounds_failed"] == 1 and r["results"][0]["ratio"] is None
    assert "Failed rounds" in r["table"]
    assert _worktrees(fake_repo["repo"]) == [f"worktree {fake_repo['repo']}"]


def test_the_worktree_goes_when_the_bench_itself_fails(fake_repo, prompts, tiny_model, monkeypatch):
    seen = []

    def broken(cfg, commands, tree_of, ctx):
        seen.append(tree_of["before"].src)
        assert (tree_of["before"].src / "directpo" / "__main__.py").exists()
        raise RuntimeError("interrupted")

    monkeypatch.setattr(wall_time, "run_rounds", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["bench", "--wall-time", "--before", fake_repo["old"], "--model", str(tiny_model), "--data",
              str(prompts)])
    assert seen and not seen[0].exists()
    assert _worktrees(fake_repo["repo"]) == [f"worktree {fake_repo['repo']}"]


def test_bad_revision_and_no_checkout_are_one_line_errors(fake_repo, prompts, tiny_model, tmp_path, monkeypatch,
                                                          capsys):
    argv = ["bench", "--wall-time", "--model", str(tiny_model), "--data", str(prompts)]
    assert main([*argv, "--before", "no-such-rev"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--before no-such-rev: not a commit of the repository" in err
    assert main(argv) == 2
    assert "--wall-time needs --before REV" in capsys.readouterr().err
    assert main([*argv, "--before", "HEAD", "--wall-commands", "online,eval"]) == 2
    assert "--wall-commands online,eval: expected" in capsys.readouterr().err
    assert main(["bench", "--before", "HEAD", "--model", str(tiny_model), "--data", str(prompts)]) == 2
    assert "add --wall-time" in capsys.readouterr().err
    assert main([*argv, "--before", "HEAD", "--sample"]) == 2
    assert "--wall-time and --sample are two separate measurements" in capsys.readouterr().err

    outside = tmp_path / "not-a-checkout" / "src"
    outside.mkdir(parents=True)
    monkeypatch.setattr(trees, "package_src", lambda: outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    assert main([*argv, "--before", "HEAD"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in a git checkout" in err
    assert _worktrees(fake_repo["repo"]) == [f"worktree {fake_repo['repo']}"]


def test_a_tree_that_imports_another_directpo_is_refused(fake_repo, prompts, tiny_model, monkeypatch, capsys):
    # the before tree's src/ lacks a directpo package the interpreter can import first
    real_env = trees.Tree.env
    monkeypatch.setattr(trees.Tree, "env", lambda self, base: {**real_env(self, base), "PYTHONPATH": "/nonexistent"})
    assert main(["bench", "--wall-time", "--before", fake_repo["old"], "--model", str(tiny_model), "--data",
                 str(prompts), "--wall-commands", "sentiment-stage"]) == 2
    assert "python imports directpo from" in capsys.readouterr().err
    assert _worktrees(fake_repo["repo"]) == [f"worktree {fake_repo['repo']}"]


def test_argv_uses_only_flags_of_both_trees_commands(tiny_model):
    """The commands' flags are parsed by this tree's CLI (the old tree's are checked by the real
    measurement: a flag it lacks fails that run in one line)."""
    from types import SimpleNamespace

    from directpo.cli import make_parser

    cfg = SimpleNamespace(model=str(tiny_model), wall_corpus="c.txt", threads=2, device="cpu", wall_scale=0.5)
    for name in wall_time.WALL_COMMANDS:
        argv = wall_time.command_argv(name, cfg, {"prompts": "p.jsonl"}, Path("out"))
        make_parser(argv[0]).parse_args(argv)  # an unknown flag would exit
        assert argv[-4:] == ["--threads", "2", "--device", "cpu"]
    argv = wall_time.command_argv("sentiment-stage", cfg, {}, Path("out"))
    assert argv[argv.index("--n-eval-prompts") + 1] == str(wall_time.SENTIMENT_EVAL_PROMPTS // 2)
    assert argv[argv.index("--corpus") + 1] == "c.txt" and argv[argv.index("--base-model") + 1] == str(tiny_model)


@pytest.mark.slow
def test_real_online_command_of_this_checkout(tiny_model, prompts, tmp_path, monkeypatch):
    """The real `python -m directpo online` of this checkout and of its HEAD (a worktree of this
    repository, removed afterwards), one tiny round each."""
    try:
        top = trees.repo_top(trees.package_src())
    except ValueError:
        pytest.skip("this checkout is not a git checkout")
    before_list = _worktrees(top)
    monkeypatch.setattr(wall_time, "ONLINE_PROMPTS", 8)
    flags = list(wall_time.ONLINE_FLAGS)
    for flag, value in (("--rounds", "1"), ("--samples-per-prompt", "4"), ("--max-new-tokens", "16"),
                        ("--eval-samples", "1"), ("--batch-size", "8"), ("--micro-batch-size", "8"),
                        ("--max-length", "96")):
        flags[flags.index(flag) + 1] = value
    monkeypatch.setattr(wall_time, "ONLINE_FLAGS", tuple(flags))
    out = tmp_path / "wall.json"
    rc = main(["bench", "--wall-time", "--before", "HEAD", "--wall-commands", "online", "--model", str(tiny_model),
               "--data", str(prompts), "--rounds", "1", "--threads", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, [x.get("log_tail") for x in r["runs"]]
    assert {x["tree"] for x in r["runs"]} == {"before", "after"}
    for x in r["runs"]:
        assert x["phases"]["sample+pair"] > 0 and x["phases"]["train"] > 0 and x["phases"]["evaluate"] > 0
        assert x["peak_rss_mib"] > 100  # torch and a model were loaded in that child
    assert _worktrees(top) == before_list
