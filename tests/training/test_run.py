"""The one step loop (`directpo.training.run.run_steps`) and what it promises every trainer: a stop is
asked for once per step, so "checkpoint saved" is never said of a checkpoint that was not written;
callbacks see every line and may stop the run; skipped steps log nothing."""
import json
from pathlib import Path

import pytest

from directpo.training import run as run_mod
from directpo.training.alarms import HealthMonitor
from directpo.training.run import Callback, Interrupted, Recipe, run_steps


class _Cfg:
    progress, log_every, save_every, eval_every, stop_on_alarm = False, 1, 0, 2, True


class _Driver:
    def __init__(self):
        self.checked = []

    def check_weights(self, what):
        self.checked.append(what)


class _Recipe(Recipe):
    """A trainer whose steps cost nothing: losses 1/step, step 3 skipped (non-finite)."""

    def __init__(self, out: Path, cfg=_Cfg()):
        self.run = run_mod.RunDir(out)
        out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.driver, self.alarms, self.saved = cfg, _Driver(), HealthMonitor("sft"), []

    def train_step(self, step):
        if step == 3:
            return None
        return {"split": "train", "step": step, "loss": 1.0 / step, "grad_norm": 1.0}

    @property
    def evaluates(self):
        return True

    def evaluate(self, step):
        return {"split": "eval", "step": step, "loss": 0.5}

    def save_checkpoint(self, step):
        self.saved.append(step)
        return f"ckpt-{step}"


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_line_is_written_and_skipped_steps_log_nothing(tmp_path):
    r = _Recipe(tmp_path / "o")
    done = run_steps(r, 0, 5, ())
    lines = _lines(tmp_path / "o")
    assert [(x["split"], x["step"]) for x in lines] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2),
                                                        ("train", 4), ("eval", 4), ("train", 5), ("eval", 5)]
    assert done["train"]["step"] == 5 and done["eval"]["step"] == 5 and done["stopped_at"] is None


def test_ctrl_c_between_two_looks_still_saves_what_it_says(tmp_path, monkeypatch):
    """The race of the old rm/ppo loops: they asked `stop.requested()` twice a step, so a Ctrl-C
    landing between the two looks raised "checkpoint saved" with none written. Here the flag
    flips after the first look of step 2: the loop must save a checkpoint whenever it stops."""
    answers = iter([False, True])
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(answers, True))
    r = _Recipe(tmp_path / "o")
    with pytest.raises(Interrupted, match="interrupted at step 2/5; checkpoint saved"):
        run_steps(r, 0, 5, ())
    assert r.saved == [2] and r.driver.checked == ["the checkpoint of step 2"]


def test_reward_model_stop_race_saves_the_checkpoint_it_names(tiny_model, tmp_path, monkeypatch):
    """The same race through the real `rm` trainer (fails on the loop it had before, which looked twice)."""
    from directpo.rlhf.config import RewardModelConfig
    from directpo.rlhf.reward_model import train_reward_model
    from directpo.training.checkpoint import list_checkpoints
    from directpo.toy import review_task, write_jsonl

    rows, _ = review_task(n_train=8, n_eval=1, seed=2)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    answers = iter([False, True])
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(answers, True))
    out = tmp_path / "rm"
    cfg = RewardModelConfig(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=4,
                            micro_batch_size=4, max_steps=3, warmup_steps=0, progress=False, threads=1, max_length=64)
    with pytest.raises(Interrupted, match="checkpoint saved"):
        train_reward_model(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]


def test_a_callback_stops_the_run_as_finished(tmp_path):
    seen = []

    class Early(Callback):
        def on_step(self, record):
            seen.append(record["step"])
            return record["step"] == 2

        def on_eval(self, record):
            seen.append(("eval", record["step"]))

    r = _Recipe(tmp_path / "o")
    done = run_steps(r, 0, 5, [Early()])
    assert done["stopped_at"] == 2 and seen == [("eval", 0), 1, 2, ("eval", 2)]
    assert r.saved == []  # a finished run: the trainer saves its final model, not a checkpoint


def test_on_checkpoint_sees_each_checkpoint(tmp_path):
    class Cfg(_Cfg):
        save_every = 2

    got = []

    class Watch(Callback):
        def on_checkpoint(self, step, path):
            got.append((step, path))

    run_steps(_Recipe(tmp_path / "o", Cfg()), 0, 5, [Watch()])
    assert got == [(2, "ckpt-2"), (4, "ckpt-4")]
