"""Issue #27, items 1 and 2: a run never writes over what is not its own, and two runs never share a
folder. Each test reproduces what lost a user's work before, and checks nothing is lost now."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import review_pairs, train_argv

from directpo.cli import main
from directpo.outputs import LOCK_FILE, OutputDirError, RunLock, RunLockedError, check_output_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_pairs(tmp_path_factory.mktemp("outdirs"), n_train=8, seed=5)


def _train(model, data, out, *extra):
    return train_argv(model, data, out, "--max-steps", "1", *extra)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_the_model_folder_as_output_is_refused_even_with_overwrite(tiny_model, data, tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "selfbase")
    before = _snapshot(model)
    for extra in ((), ("--overwrite",)):
        assert main(_train(model, data, model, *extra)) == 2
        assert f"--output-dir {model} is --model {model}" in _one_line(capsys)
    assert _snapshot(model) == before  # the starting weights are untouched
    # inside the model's folder, or a folder holding the data: refused as well
    assert main(_train(model, data, model / "out", "--overwrite")) == 2
    assert "lies inside --model" in _one_line(capsys) and not (model / "out").exists()
    assert main(_train(tiny_model, data, data.parent, "--overwrite")) == 2
    assert f"contains --data {data}" in _one_line(capsys)


def test_a_folder_of_user_files_is_refused_unless_overwrite(tiny_model, data, tmp_path, capsys):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "README.md").write_text("my notes\n")
    (project / "config.json").write_text('{"mine": true}\n')
    assert main(_train(tiny_model, data, project)) == 2
    line = _one_line(capsys)
    assert "is not empty and holds no directpo run (README.md, config.json)" in line and "--overwrite" in line
    assert _snapshot(project) == {"README.md": b"my notes\n", "config.json": b'{"mine": true}\n'}
    assert main(_train(tiny_model, data, project, "--overwrite")) == 0  # asked for: written into
    assert (project / "model.safetensors").exists() and not (project / LOCK_FILE).exists()


def test_overwrite_drops_the_replaced_runs_checkpoints_not_the_users_files(tiny_model, data, tmp_path, capsys):
    """--overwrite replaces a run: its checkpoints went on sitting beside the new run's, so a later
    --resume continued the OLD run from its higher step. They go now; anything else in checkpoints/
    (not a directpo step-N folder) stays."""
    out = tmp_path / "run"
    assert main(train_argv(tiny_model, data, out, "--max-steps", "4", "--save-every", "2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    (out / "checkpoints" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(train_argv(tiny_model, data, out, "--max-steps", "1", "--overwrite")) == 0
    assert "removed the 2 checkpoint(s) of the run it replaces" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["notes.txt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1


def test_output_dir_naming_a_file_says_so(tiny_model, data, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(_train(tiny_model, data, f)) == 2
    assert "is a file, not a folder" in _one_line(capsys) and f.read_text() == "x"


def test_a_failed_run_leaves_no_empty_folder(tiny_model, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main(_train(tiny_model, tmp_path / "missing.jsonl", out)) == 2
    assert not out.exists()


def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with RunLock(tmp_path / "o", "train") as first:
        record = json.loads((tmp_path / "o" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "train"
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on "):
            RunLock(tmp_path / "o").acquire()
        assert first.held
    assert not (tmp_path / "o" / LOCK_FILE).exists()  # released: the file goes with it


def test_a_dead_runs_lock_is_taken_over_with_a_log_line(tmp_path, capsys):
    folder = tmp_path / "o"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (folder / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00", "command": "train"}))
    with RunLock(folder, "train"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of {folder} from a run that is no longer running (pid {int(dead.stdout)}" \
        in capsys.readouterr().err


def test_a_lock_record_from_another_machine_is_not_taken_over(tmp_path):
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "some-other-node", "started": "x"}))
    with pytest.raises(RunLockedError, match="on another machine .* delete .*\\.directpo\\.lock"):
        RunLock(folder).acquire()


def test_two_runs_started_together_one_is_refused_the_other_intact(tiny_model, data, tmp_path):
    """Before: both exited 0 and printed "saved"; the folder held the second run alone. Now the
    second is refused naming the first, whose run is whole."""
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "directpo"]
    procs = []
    for seed in (0, 1):
        procs.append(subprocess.Popen(cmd + _train(tiny_model, data, out, "--seed", str(seed), "--max-steps", "3"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.3)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    # (on a loaded machine the first may have finished before the second looked: then it meets a
    # finished run instead of a lock; refused either way, without a traceback)
    assert ("is in use by another run (pid" in refused or "already holds a run" in refused) and \
        "Traceback" not in refused, refused
    winner = next(i for i, (rc, _) in enumerate(results) if rc == 0)
    assert json.loads((out / "directpo_config.json").read_text())["seed"] == winner
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # no stray or foreign lines
    assert (out / "run_complete.json").exists() and not (out / LOCK_FILE).exists()


def test_check_output_dir_relations(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    check_output_dir(tmp_path / "elsewhere", {"--model": str(model), "--data": "owner/hub-dataset"}, False)
    with pytest.raises(OutputDirError, match="is --model"):
        check_output_dir(model, {"--model": str(model)}, True)
    with pytest.raises(OutputDirError, match="contains --model"):
        check_output_dir(tmp_path, {"--model": str(model)}, True)
    with pytest.raises(OutputDirError, match="lies inside --model"):
        check_output_dir(model / "x", {"--model": str(model)}, True)
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputDirError, match="is --model"):  # through a symlink too
        check_output_dir(link, {"--model": str(model)}, True)
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    with pytest.raises(OutputDirError, match="lies inside --data"):  # a `datasets` folder with its split
        check_output_dir(data_dir / "o", {"--data": f"{data_dir}:train"}, True)
