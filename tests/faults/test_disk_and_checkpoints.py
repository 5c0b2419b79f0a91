"""Issue #27, items 4 and 5: a full disk is one line naming the file, the disk and the space, leaves
no partial file and keeps every earlier checkpoint; a damaged checkpoint is found before it is
trusted, named, and the newest intact one offered. Before: torch's "unexpected pos" and
safetensors' SafetensorError tracebacks; "invalid header length" on resume; flipped weights resumed
and failed later as a "non-finite loss"."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from inject import FillsUp  # (tests/faults/inject.py: the same full disk as the CLI runs get)
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from directpo import diskio, reference
from directpo.cli import main
from directpo.models import load_model
from directpo.toy import review_task, write_jsonl
from directpo.training import checkpoint
from directpo.training.checkpoint import (CheckpointError, check_checkpoint, latest_checkpoint, latest_good_checkpoint,
                                       list_checkpoints, load_checkpoint, save_checkpoint, save_sharded_checkpoint)
from directpo.training.distributed import Dist
from directpo.training.optim import build_optimizer, warmup_schedule

FAULTS = Path(__file__).resolve().parent / "inject.py"
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"
ENOSPC_TORCH = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"

# one tokenized pair, as the reference cache keys it (prompt ids, the responses' ids)
ONE_PAIR = SimpleNamespace(prompt_ids=[1, 2], response_ids=[[3], [4]])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=24, n_eval=1, seed=11)
    return write_jsonl(rows, tmp_path_factory.mktemp("disk") / "d.jsonl")


def _argv(model, data, out, *extra, steps=4):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", str(steps),
            "--warmup-steps", "2", "--max-length", "64", "--save-every", "1", "--no-progress", "--threads", "1",
            *extra]


def _run(argv, *fault):
    """`directpo ARGV` in a fresh process, through tests/faults/inject.py when a fault is named."""
    cmd = [sys.executable, str(FAULTS), *fault] if fault else [sys.executable, "-m", "directpo"]
    p = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stderr


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def full_run(tiny_model, data, tmp_path_factory):
    """The uninterrupted run the faulted ones must end equal to."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(_argv(tiny_model, data, out)) == 0
    return out


# ---- full disk: checkpoints and the final model, end to end ----

def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_is_bit_identical(tiny_model, data, full_run, tmp_path):
    out = tmp_path / "o"
    rc, err = _run(_argv(tiny_model, data, out, "--keep-last", "2"), "--enospc-at-checkpoint", "3")
    line = _last_line(err)
    assert rc == 2 and line.startswith("directpo train: error: No space left on device "), err
    assert re.search(rf"writing {out}/checkpoints/step-00000003/optimizer.pt \(needs ~0\.\d MB, 0\.2 MB free\)", line)
    assert "earlier checkpoints in" in line and "are intact" in line
    assert "warning: checkpoint" in err and "has 0.2 MB free: the save will likely fail" in err  # said before
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000002"]  # no temp dir, no pruning
    for ck in list_checkpoints(out):
        check_checkpoint(ck)
    rc, err = _run(_argv(tiny_model, data, out, "--keep-last", "2", "--resume"))  # the disk has room again
    assert rc == 0 and "resumed from" in err and "at step 2" in err, err
    _same_weights(full_run, out)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003", "step-00000004"]


def test_a_full_disk_at_the_final_save_writes_nothing_and_resume_finishes(tiny_model, data, full_run, tmp_path):
    out = tmp_path / "o"
    rc, err = _run(_argv(tiny_model, data, out), "--enospc-at-final-save")
    line = _last_line(err)
    assert rc == 2 and line.startswith("directpo train: error: No space left on device "), err
    assert re.search(rf"writing {out} \(needs ~0\.\d MB, 0\.2 MB free\); the final model was not written", line)
    assert "warning: the final model" in err
    assert not [f for f in os.listdir(out) if f.startswith(("model", ".tmp", "config.json", "run_complete"))]
    assert latest_checkpoint(out).name == "step-00000004"
    rc, err = _run(_argv(tiny_model, data, out, "--resume"))
    assert rc == 0, err
    _same_weights(full_run, out)
    assert (out / "run_complete.json").exists()


# ---- full disk: each writer, in process ----

def test_torch_save_on_a_full_disk_raises_the_os_error_not_unexpected_pos(tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(diskio, "open", lambda p, mode="r", *a, **k: FillsUp(real_open(p, mode, *a, **k), 300)
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    target = tmp_path / "x.pt"
    with pytest.raises(diskio.DiskWriteError) as e:
        with diskio.replacing(target, 4_000_000) as tmp:
            diskio.dump_torch({"a": torch.zeros(1000)}, tmp)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value.__cause__, OSError)  # torch's RuntimeError hid it
    assert str(e.value).startswith("No space left on device ") and f"writing {target} (needs ~4.0 MB, " in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, start", [
    (SafetensorError(ENOSPC_SAFETENSORS), "No space left on device "),
    (RuntimeError(ENOSPC_TORCH), "No space left on device "),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded on device "),
    (OSError(errno.EIO, "Input/output error"), "Input/output error writing "),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system writing "),
])
def test_every_library_s_write_failure_is_one_line_naming_the_file(tmp_path, error, start):
    err = diskio.write_error(error, tmp_path / "f.bin", 2_500_000)
    assert isinstance(err, OSError) and str(err).startswith(start) and f"{tmp_path / 'f.bin'}" in str(err)
    assert "\n" not in str(err) and "[Errno" not in str(err)
    if "space" in start or "quota" in start:
        assert "(needs ~2.5 MB, " in str(err) and str(err).endswith(" MB free)")


def test_other_errors_keep_their_own_message(tmp_path):
    for e in (ValueError("bad value"), RuntimeError("1 tensors of the file were never written"), KeyError("k")):
        assert diskio.write_error(e, tmp_path / "f") is None
    with pytest.raises(ValueError, match="bad value"):
        with diskio.replacing(tmp_path / "f"):
            raise ValueError("bad value")
    assert list(tmp_path.iterdir()) == []


def test_the_free_space_check_warns_before_the_save(tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type(usage)(usage.total, usage.total - 1_000_000, 1_000_000))
    assert diskio.warn_if_short(tmp_path / "not" / "yet", 500_000, "this") is True
    assert diskio.warn_if_short(tmp_path / "not" / "yet", 3_000_000, "the final model") is False
    assert "warning: the final model needs ~3.0 MB but " in capsys.readouterr().err


def _stepped(tiny_model, seed=0):
    torch.manual_seed(seed)
    model = load_model(str(tiny_model))
    opt = build_optimizer(model.parameters(), "adamw", 1e-2, 0.01)
    sched = warmup_schedule(opt, 2)
    ids = torch.randint(0, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return model, opt, sched


def test_a_failed_checkpoint_removes_its_draft_and_prunes_nothing(tiny_model, tmp_path, monkeypatch, one_thread):
    model, opt, sched = _stepped(tiny_model)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, 0, model, opt, sched, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]

    def full(tensors, path, *a, **k):
        Path(path).write_bytes(b"\0" * 100)  # a partial file in the draft
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(diskio.DiskWriteError, match=r"^No space left on device .* writing .*step-00000003/"
                                                     r"model.safetensors \(needs ~0\.\d MB, .*earlier checkpoints"):
        save_checkpoint(tmp_path, 3, 0, model, opt, sched, {}, keep_last=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000002"]
    check_checkpoint(tmp_path / "checkpoints" / "step-00000002")


def test_the_final_model_and_its_export_leave_the_folder_as_it_was(tiny_model, tmp_path, monkeypatch, one_thread):
    import transformers.modeling_utils as mu

    from directpo.training import export
    from directpo.training.lora import apply_lora, save_policy

    model, _, _ = _stepped(tiny_model)
    out = tmp_path / "out"
    save_policy(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())  # not 0600

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 4096)
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(diskio.DiskWriteError, match=f"writing {out} .*the final model was not written"):
        save_policy(model, out)
    lora = apply_lora(load_model(str(tiny_model)), 4, 16.0, "all-linear", 0.0)
    import peft.peft_model
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    with pytest.raises(diskio.DiskWriteError, match=f"^No space left on device .* writing {out} "):
        save_policy(lora, out)
    monkeypatch.setattr(export.SafetensorsStream, "open", lambda self, p: _open_full(self, p))
    with pytest.raises(diskio.DiskWriteError, match=f"writing {out / 'model.safetensors'} "):
        export.export_model(model, out, Dist())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _open_full(stream, path):
    stream.file = FillsUp(open(path, "wb"), 100)
    return stream.close


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_reference_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(reference, "save_file", full)
    table, hit = reference.reference_logps(None, [ONE_PAIR], lambda m, ex: torch.zeros(1, 2), cache_dir=tmp_path,
                                           model_fp="m")
    assert table.shape == (1, 2) and not hit
    err = capsys.readouterr().err
    assert "warning: reference log-probs not cached: No space left on device " in err and "going on" in err
    assert list(tmp_path.iterdir()) == []


# ---- damaged checkpoints ----

def _truncate(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


def _flip(f: Path) -> None:
    """Bytes changed in the middle of the file (a safetensors file's tensor data, a torch record's)."""
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4] = bytes(255 - b for b in raw[mid:mid + 4])
    f.write_bytes(bytes(raw))


def _garble(f: Path) -> None:
    f.write_text("{" + "x" * (len(f.read_text()) - 1))


DAMAGE = {  # (file, how, what the manifest check says, what the check of a checkpoint without one says)
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors is truncated",
                          "model.safetensors is truncated"),
    "truncated optimizer": ("optimizer.pt", _truncate, "optimizer.pt is truncated", "optimizer.pt is truncated or"),
    "corrupt state.json": ("state.json", _garble, "state.json is unreadable", "state.json is unreadable"),
    "flipped weights": ("model.safetensors", _flip, "model.safetensors has changed since it was written", None),
    "flipped optimizer": ("optimizer.pt", _flip, "optimizer.pt has changed", "optimizer.pt is corrupt"),
}


@pytest.fixture
def two_checkpoints(tiny_model, tmp_path, one_thread):
    model, opt, sched = _stepped(tiny_model)
    return [save_checkpoint(tmp_path, s, 0, model, opt, sched, {"lr": 1e-2}) for s in (1, 2)], (model, opt, sched)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "before-manifests"])
@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_is_named_with_the_checkpoint_to_use(two_checkpoints, tmp_path, kind, manifest, capsys):
    (good, bad), (model, opt, sched) = two_checkpoints
    name, damage, said, said_without = DAMAGE[kind]
    if not manifest:
        for ck in (good, bad):
            (ck / "manifest.json").unlink()
        said = said_without
    damage(bad / name)
    if said is None:  # flipped weights without a manifest: nothing on disk tells (they still load)
        assert latest_checkpoint(tmp_path) == bad
        return
    for attempt in (lambda: latest_checkpoint(tmp_path), lambda: load_checkpoint(bad, model, opt, sched)):
        with pytest.raises(CheckpointError) as e:
            attempt()
        assert str(e.value).startswith(f"checkpoint {bad} is damaged: {said}")
        assert str(e.value).endswith(f"the newest intact checkpoint is {good}: resume from it with --resume {good} "
                                     "(or --resume-from-last-good)")
    assert latest_good_checkpoint(tmp_path) == good
    assert f"warning: checkpoint {bad} is damaged" in capsys.readouterr().err
    load_checkpoint(good, model, opt, sched)


def test_with_no_intact_checkpoint_the_error_says_to_start_again(two_checkpoints, tmp_path):
    for ck in two_checkpoints[0]:
        _truncate(ck / "optimizer.pt")
    for find in (latest_checkpoint, latest_good_checkpoint):
        with pytest.raises(CheckpointError, match="no other checkpoint in .* is intact: start the run again"):
            find(tmp_path)


def test_a_checkpoint_from_before_manifests_resumes_exactly(two_checkpoints, tiny_model, one_thread):
    (_, ck), (model, opt, _) = two_checkpoints
    (ck / "manifest.json").unlink()
    fresh, fresh_opt, fresh_sched = _stepped(tiny_model, seed=1)
    assert load_checkpoint(ck, fresh, fresh_opt, fresh_sched)["step"] == 2
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_the_manifest_lists_every_file_and_resuming_hashes_each_once(two_checkpoints, tmp_path, monkeypatch):
    (_, ck), (model, opt, sched) = two_checkpoints
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    assert all(manifest[f]["size"] == (ck / f).stat().st_size for f in manifest)
    hashed = []
    real = diskio.file_sha256
    monkeypatch.setattr(diskio, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    checkpoint._VERIFIED.clear()
    assert latest_checkpoint(tmp_path) == ck  # what --resume does: find it, read its settings, load it
    checkpoint.checkpoint_state(ck)
    load_checkpoint(ck, model, opt, sched)
    assert sorted(hashed) == sorted(manifest)


def test_a_sharded_checkpoint_carries_a_manifest_too(tiny_model, tmp_path, one_thread):
    model, opt, sched = _stepped(tiny_model)
    ck = save_sharded_checkpoint(tmp_path, 1, 0, model, opt, sched, {}, Dist())
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert "shards/.metadata" in files and "scheduler.pt" in files and any(f.endswith(".distcp") for f in files)
    shard = next(ck / f for f in files if f.endswith(".distcp"))
    _truncate(shard)
    with pytest.raises(CheckpointError, match=f"{shard.relative_to(ck).as_posix()} is truncated"):
        load_checkpoint(ck, model, opt, sched)


@pytest.mark.parametrize("kind", ["truncated weights", "corrupt state.json", "flipped weights"])
def test_resume_of_a_damaged_run_is_one_line_and_the_named_checkpoint_works(tiny_model, data, tmp_path, capsys,
                                                                              kind):
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, steps=3)) == 0
    name, damage, said, _ = DAMAGE[kind]
    bad, good = out / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000002"
    damage(bad / name)
    capsys.readouterr()
    assert main(_argv(tiny_model, data, out, "--resume", steps=3)) == 2
    line = _last_line(capsys.readouterr().err)
    assert f"checkpoint {bad} is damaged: {said}" in line and f"--resume {good}" in line
    assert main(_argv(tiny_model, data, out, "--resume", str(good), steps=3)) == 0
    check_checkpoint(bad)  # rewritten whole by the resumed run


def test_a_staged_save_moves_in_whole_and_clears_what_killed_saves_left(tmp_path):
    out = tmp_path / "out"
    (out / ".tmp-save-999999999").mkdir(parents=True)  # a save killed mid-write (no such process)
    (out / f".tmp-save-{os.getppid()}").mkdir()  # a live process's: not ours to remove
    (out / "model.safetensors").write_bytes(b"old")
    with diskio.staging_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        (tmp / "config.json").write_text("{}")
        assert (out / "model.safetensors").read_bytes() == b"old"  # nothing moves before the save is whole
    assert sorted(os.listdir(out)) == [f".tmp-save-{os.getppid()}", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"new"
