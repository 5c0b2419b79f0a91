"""What the studies share: the study clock keeps counting across a resume."""
import json
import time

from directpo.experiments.common import StudyClock


def test_study_clock_adds_the_time_of_earlier_sessions(tmp_path):
    record = tmp_path / "study_time.json"
    first = StudyClock("s", 2, record)
    first.step(1, "slow", time.sleep, 0.05)
    spent = json.loads(record.read_text())["seconds"]
    assert spent >= 0.05
    again = StudyClock("s", 2, record)  # a resumed study: its finished stages take no time now
    again.step(1, "slow", lambda: None)
    assert again.elapsed() >= spent and json.loads(record.read_text())["seconds"] >= spent
    assert StudyClock("s", 2).elapsed() < spent  # without a record: this session only


def test_a_stage_run_stopped_before_its_first_checkpoint_starts_again(tiny_model, tmp_path):
    """A study's stage run killed before it wrote a checkpoint left a log and no state: the study
    trains it again rather than stop on `--resume`'s refusal (a user's own run still refuses: it might
    hold work). A finished run is skipped; one with a checkpoint continues from it."""
    import pytest

    from directpo.experiments.common import continue_run, train_resumable
    from directpo.toy import review_task, write_jsonl
    from directpo.training import TrainConfig, train

    task = write_jsonl(review_task(n_train=16, n_eval=2, seed=5)[0], tmp_path / "train.jsonl")

    settings = dict(model=str(tiny_model), data=str(task), batch_size=4, micro_batch_size=4, max_steps=2,
                    warmup_steps=0, progress=False, max_length=64, precompute_ref=False)
    out = tmp_path / "stage"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 0.69}\n')  # killed at step 1
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(TrainConfig(output_dir=str(out), resume="latest", **settings))
    assert continue_run(out) == {"resume": None, "overwrite": True}
    done = train_resumable(output_dir=str(out), **settings)
    assert done["train"]["step"] == 2
    assert continue_run(tmp_path / "fresh") == {"resume": "latest"}
    assert train_resumable(output_dir=str(out), **settings) == done  # finished: skipped, its record returned
