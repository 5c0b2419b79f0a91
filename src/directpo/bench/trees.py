"""The two source trees of `directpo bench --wall-time`: this checkout's code ("after") and a git
revision of its repository checked out in a temporary worktree ("before").

`git worktree add --detach` leaves this checkout's branch, index and files as they are (it records
the extra worktree under .git/worktrees, removed again by `git worktree remove`); the repository's
hooks are switched off for it, so checking out the old tree runs nothing of the repository's."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserValueError


@dataclass
class Tree:
    """A tree whose `src/` the measured commands import directpo from."""

    label: str          # "before" / "after"
    src: Path           # put first on PYTHONPATH
    commit: str         # full hash (after: this checkout's HEAD)
    rev: str            # as the user named it (after: HEAD)
    dirty: bool = False  # after: uncommitted changes to tracked files were measured too

    def env(self, base: dict) -> dict:
        """`base` with PYTHONPATH naming this tree's src/ alone: both trees run on the same venv's
        libraries, and neither sees the other's directpo."""
        return {**base, "PYTHONPATH": str(self.src)}


def _git(top: Path | str, *args: str) -> subprocess.CompletedProcess:
    # hooks off: a post-checkout hook of the repository must not run when the bench checks out a tree
    return subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-C", str(top), *args],
                          capture_output=True, text=True)


def package_src() -> Path:
    """The src/ directory this process imports directpo from (this checkout's code)."""
    return Path(__file__).resolve().parents[2]


def repo_top(start: Path) -> Path:
    """The top of the git checkout holding `start`; a one-line error when there is none."""
    if shutil.which("git") is None:
        raise UserValueError("--wall-time needs git on PATH (to check out --before REV in a worktree)")
    done = _git(start, "rev-parse", "--show-toplevel")
    if done.returncode != 0:
        raise UserValueError(f"--before: {start} is not in a git checkout: --wall-time checks out REV in a worktree "
                             "of the repository holding directpo's code")
    return Path(done.stdout.strip())


def resolve(top: Path, rev: str) -> str:
    """The full hash of commit `rev` in the repository at `top`; a one-line error naming it when unknown."""
    done = _git(top, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if done.returncode != 0 or not done.stdout.strip():
        raise UserValueError(f"--before {rev}: not a commit of the repository at {top}")
    return done.stdout.strip()


def after_tree(top: Path, src: Path) -> Tree:
    head = resolve(top, "HEAD")
    dirty = bool(_git(top, "status", "--porcelain", "--untracked-files=no").stdout.strip())
    return Tree("after", src, head, "HEAD", dirty)


@contextlib.contextmanager
def before_tree(top: Path, rev: str, commit: str, parent: Path, src_rel: Path):
    """REV checked out (detached) in a worktree under `parent`, removed when the block ends however
    it ends (`git worktree remove --force`; failing that, the folder deleted and the record pruned)."""
    path = Path(parent) / "before-tree"
    done = _git(top, "worktree", "add", "--detach", str(path), commit)
    if done.returncode != 0:
        raise UserValueError(f"--before {rev}: git worktree add failed: {_last_line(done)}")
    try:
        src = path / src_rel
        if not (src / "directpo" / "__main__.py").exists():
            raise UserValueError(f"--before {rev}: that commit has no {src_rel}/directpo/__main__.py to run")
        yield Tree("before", src, commit, rev)
    finally:
        if _git(top, "worktree", "remove", "--force", str(path)).returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            _git(top, "worktree", "prune")


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def check_imports(tree: Tree, base_env: dict) -> None:
    """Each tree's commands import its own directpo (an install that shadows PYTHONPATH would time
    the same code twice): refused in one line when the package found lies elsewhere."""
    code = "import directpo, os; print(os.path.realpath(directpo.__file__))"
    done = subprocess.run([sys.executable, "-c", code], env=tree.env(base_env), capture_output=True, text=True)
    found = done.stdout.strip()
    if done.returncode != 0 or not found.startswith(os.path.realpath(tree.src) + os.sep):
        raise UserValueError(f"--wall-time: with PYTHONPATH={tree.src}, python imports directpo from "
                             f"{found or '(nowhere: ' + _last_line(done) + ')'}, not from the {tree.label} tree")
