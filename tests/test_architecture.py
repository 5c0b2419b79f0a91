"""The layers of docs/ARCHITECTURE.md hold: `lint-imports` keeps every contract of pyproject.toml
(and breaks on a planted forbidden import, so the check can fail); no function in src/ is longer
than 80 lines."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "directpo"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed (the dev extra)")


def _lint(src_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src_root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path):
    r = _lint(REPO / "src", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("losses.py", "from .training import loop", "Layers"),              # the pure computation importing the trainer
    ("eval/bon.py", "from ..rlhf import ppo", "Layers"),              # eval using rlhf (rlhf is built on eval)
    ("training/optim.py", "import trl", "TRL is the benchmark's alone"),
])
def test_a_planted_forbidden_import_breaks_the_contracts(tmp_path, module, planted, contract):
    shutil.copytree(SRC, tmp_path / "src" / "directpo", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "src" / "directpo" / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    r = _lint(tmp_path / "src", tmp_path)
    assert r.returncode != 0
    assert f"{contract}" in r.stdout and "BROKEN" in r.stdout


def test_no_function_longer_than_80_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
