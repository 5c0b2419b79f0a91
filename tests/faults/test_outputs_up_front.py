"""Issue #27 item 7: `eval`, `sample` and `score` found an unwritable --out only at the end (after 19 s
of sampling and scoring; with a paid judge, every call wasted). Now it is refused before any model
loads. (The tests run as root, for whom every folder is writable: the refusal is shown by making
`os.access` answer as it does for a user without permission, or on a read-only filesystem.)"""
import os

import pytest

from directpo.cli import main
from directpo.outputs import check_outputs


@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(folder) and
                        mode & os.W_OK else real(p, mode, **kw))
    return folder


@pytest.mark.parametrize("command, extra", [
    ("sample", ["--prompts", "PROMPTS"]),
    ("score", ["--data", "PROMPTS"]),
    ("eval", ["--prompts", "PROMPTS", "--ref", "no/such-ref", "--reward-fn", "os:getcwd"]),
])
def test_an_unwritable_out_is_refused_before_anything_loads(unwritable, tmp_path, monkeypatch, capsys, command, extra):
    import directpo.models as models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    argv = [command, "--model", "no/such-model", "--out", str(unwritable / "out.jsonl"),
            *[str(prompts) if a == "PROMPTS" else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert f"--out {unwritable / 'out.jsonl'}: cannot write in {unwritable} (no write permission)" in err


def test_a_read_only_filesystem_is_named(tmp_path, monkeypatch):
    real_statvfs = os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (mode & os.W_OK))
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if str(p).startswith(str(tmp_path)) else real_statvfs(p))
    with pytest.raises(PermissionError, match="cannot write in .* \\(read-only file system\\)"):
        check_outputs({"--out": str(tmp_path / "a" / "b" / "r.json")}, {}, False)  # (folders not made yet)
