"""`<out>.partial` (`directpo.eval.partial`): a run's finished prompts, kept across a failure."""
import json

import pytest

from directpo.errors import UserValueError
from directpo.eval.partial import Partial, identity


def test_a_torn_last_write_keeps_only_whole_prompts(tmp_path):
    """A run killed mid-write leaves a row cut off, or a prompt with some of its rows: what is read
    back is the whole prompts, and the file is cut to them before anything is appended."""
    out = tmp_path / "s.jsonl"
    p = Partial(out, {"seed": 1}, rows_per_prompt=2)
    p.start(4)
    p.add({3: [{"prompt_index": 3, "index": 0}, {"prompt_index": 3, "index": 1}]})
    with open(p.path, "a") as f:
        f.write(json.dumps({"prompt_index": 0, "index": 0}) + "\n" + '{"prompt_index": 0, "ind')
    p.release()  # (the killed run's process is gone: its lock with it)
    again = Partial(out, {"seed": 1}, rows_per_prompt=2)
    assert list(again.done) == [3] and again.batch_size == 4
    assert len(again.path.read_text().splitlines()) == 3  # header and prompt 3's rows
    again.add({0: [{"prompt_index": 0, "index": 0}, {"prompt_index": 0, "index": 1}]})
    assert [(r["prompt_index"], r["index"]) for r in again.finish()] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert not again.path.exists() and len(out.read_text().splitlines()) == 4


def test_another_runs_partial_is_refused_naming_the_setting(tmp_path):
    out = tmp_path / "s.jsonl"
    Partial(out, {"seed": 1, "top_p": 1.0}, 1).start(2)
    with pytest.raises(UserValueError, match="--top-p was 1.0, now 0.9.*--overwrite"):
        Partial(out, {"seed": 1, "top_p": 0.9}, 1)
    (tmp_path / "t.jsonl.partial").write_text("not json\n")
    with pytest.raises(UserValueError, match="not a partial output"):
        Partial(tmp_path / "t.jsonl", {}, 1)
    assert Partial(tmp_path / "t.jsonl", {}, 1, overwrite=True).done == {}
    assert not (tmp_path / "t.jsonl.partial").exists()


def test_a_model_folders_identity_follows_its_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 300_000)
    first = identity(str(tmp_path / "m"))
    assert identity(str(tmp_path / "m")) == first and identity("org/hub-model") is None
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 299_999 + b"\1")
    assert identity(str(tmp_path / "m")) != first


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """Two runs appending to one partial would interleave their rows; the second is refused until the
    first ends (finished, failed or killed: the lock goes with its process)."""
    out = tmp_path / "s.jsonl"
    first = Partial(out, {"seed": 1}, 1)
    first.start(2)
    with pytest.raises(UserValueError, match="another run is writing .*s.jsonl"):
        Partial(out, {"seed": 1}, 1)
    first.add({0: [{"prompt_index": 0}]})
    first.finish()
    assert not (tmp_path / "s.jsonl.partial.lock").exists()
    Partial(out, {"seed": 1}, 1).release()  # free again
