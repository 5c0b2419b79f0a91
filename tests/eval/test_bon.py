"""`directpo bon`: written as it goes, so a reward function failing late loses only the batch in
flight, and the same command continues to the file an uninterrupted run writes."""
import json

import pytest

from directpo.cli import main
from test_sample import PROMPTS, SAMPLE, completed_by_batch, interrupt_after, prompt_file

REWARD = '''import os
from directpo.eval.scorers import review_sentiment
calls = 0

def score(prompts, completions):
    global calls
    calls += 1
    if calls == int(os.environ.get("BON_FAIL_AT", "0")):
        raise RuntimeError("the reward server went away")
    return [review_sentiment(p, c) for p, c in zip(prompts, completions)]

score.batched = True
'''


def test_a_failing_reward_keeps_the_scored_prompts_and_a_rerun_continues(tiny_model, tmp_path, monkeypatch, capsys):
    from directpo.models import load_tokenizer

    (tmp_path / "bon_resume_reward.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    argv = ["bon", "--model", str(tiny_model), "--prompts", str(prompt_file(tmp_path)), "--reward-fn",
            "bon_resume_reward:score"] + SAMPLE
    assert main(argv + ["--out", "whole.jsonl"]) == 0
    monkeypatch.setenv("BON_FAIL_AT", "3")
    import bon_resume_reward
    bon_resume_reward.calls = 0
    with pytest.raises(RuntimeError, match="went away"):
        main(argv + ["--out", "b.jsonl"])
    kept = [g for g in completed_by_batch(load_tokenizer(str(tiny_model)), PROMPTS, 3, 2) if g]
    kept = kept[0] + kept[1]  # the prompts of the reward's first 2 calls
    assert f"{len(kept)} of 8 prompts done, kept in b.jsonl.partial: rerun the same command" in capsys.readouterr().err
    rows = (tmp_path / "b.jsonl.partial").read_text().splitlines()[1:]
    whole = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert sorted(rows) == sorted(whole[i] for i in kept)
    assert json.loads(whole[kept[0]])["reward"] == max(json.loads(whole[kept[0]])["rewards"])

    monkeypatch.delenv("BON_FAIL_AT")
    other = [a.replace("bon_resume_reward:score", "directpo.eval.scorers:review_sentiment") for a in argv]
    assert main(other + ["--out", "b.jsonl"]) == 2
    assert "the reward was 'bon_resume_reward:score', now 'directpo.eval.scorers:review_sentiment'" in \
        capsys.readouterr().err
    calls = interrupt_after(monkeypatch, 10**6)
    assert main(argv + ["--out", "b.jsonl"]) == 0
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert not (tmp_path / "b.jsonl.partial").exists() and len(calls) < 12
