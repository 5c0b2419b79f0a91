"""--report-to: TensorBoard event files and W&B offline runs hold the metrics as logged (read back)."""
import glob
import json
import struct
import time

import pytest

from directpo.training.loggers import NullLogger, check_report_to, make_logger, scalars_of

TRAIN = [{"split": "train", "step": s, "epoch": 0, "loss": 0.7 / s, "rewards/accuracies": 0.25 * s, "lr": 1e-4 * s,
          "grad_norm": 2.0 + s, "note": "text", "flag": True, "missing": None} for s in (1, 2, 3)]
EVAL = [{"split": "eval", "step": s, "loss": 0.69 - 0.01 * s, "rewards/accuracies": 0.5 + 0.1 * s} for s in (0, 3)]


def _log_run(logger, train=TRAIN, evals=EVAL):
    for rec in sorted(train + evals, key=lambda r: (r["step"], r["split"] == "train")):
        logger.log(rec, rec["step"], rec["split"])
    logger.close()


def test_scalars_of_skips_non_numbers_and_coordinates():
    assert scalars_of(TRAIN[0]) == {"epoch": 0.0, "loss": 0.7, "rewards/accuracies": 0.25, "lr": 1e-4, "grad_norm": 3.0}


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(make_logger("tensorboard", tmp_path, {"beta": 0.1, "loss": "dpo"}))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/epoch", "train/loss", "train/rewards/accuracies", "train/lr", "train/grad_norm",
                    "eval/loss", "eval/rewards/accuracies"}  # no split, step, strings, booleans, None
    for tag, records in [("train/loss", TRAIN), ("train/rewards/accuracies", TRAIN), ("train/lr", TRAIN),
                         ("train/grad_norm", TRAIN), ("eval/loss", EVAL), ("eval/rewards/accuracies", EVAL)]:
        events = acc.Scalars(tag)
        key = tag.split("/", 1)[1]
        assert [e.step for e in events] == [r["step"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)  # float32
    assert "settings/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_resume_hides_the_steps_redone(tmp_path):
    """A run killed at step 3 after its step-2 checkpoint redoes step 3: the new value is the one shown."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(make_logger("tensorboard", tmp_path, {}))
    resumed = make_logger("tensorboard", tmp_path, {}, start_step=2)
    resumed.log({"loss": 9.0}, 3, "train")
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(1, 0.7), (2, 0.35), (3, 9.0)]


def _wandb_records(path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):  # still being written
            return
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _finished_records(path, timeout: float = 60.0):
    """The records, once W&B's service process has written the run's last ("exit") record: it may
    still be flushing the file when `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("wandb.proto.wandb_internal_pb2")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = make_logger("wandb", tmp_path, {"beta": 0.1, "loss": "dpo"})
    assert logger.run.settings.mode == "offline"  # nothing leaves the machine unless WANDB_MODE says so
    _log_run(logger)
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = _finished_records(files[0])
    history, config = {}, {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert config["beta"] == 0.1 and config["loss"] == "dpo"
    assert sorted(history) == [0, 1, 2, 3]
    assert history[0] == {"eval/loss": pytest.approx(0.69), "eval/rewards/accuracies": pytest.approx(0.5)}
    assert history[3]["train/loss"] == pytest.approx(0.7 / 3) and history[3]["eval/rewards/accuracies"] == \
        pytest.approx(0.8)
    assert "train/note" not in history[1] and "train/flag" not in history[1]


def test_none_unknown_and_missing_packages(tmp_path, monkeypatch):
    logger = make_logger("none", tmp_path, {})
    assert isinstance(logger, NullLogger)
    logger.log({"loss": 1.0}, 1, "train")
    logger.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, wandb; got 'mlflow'"):
        make_logger("mlflow", tmp_path, {})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else real(name, *a))
    for backend in ("tensorboard", "wandb"):
        with pytest.raises(ValueError, match=rf"--report-to {backend} needs `pip install 'directpo\[report\]'`"):
            check_report_to(backend)
        with pytest.raises(ValueError, match="directpo\\[report\\]"):
            make_logger(backend, tmp_path, {})
