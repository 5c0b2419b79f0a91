"""`directpo sample` and Best-of-N: output format, seeded reproducibility, left padding, prompt files."""
import json

import pytest
import torch

from directpo.cli import main
from directpo.data.prompts import PromptItem, encode_prompt, load_prompts
from directpo.eval.sampling import draw_samples, generate_completions
from directpo.models import load_model, load_tokenizer
from directpo.toy import review_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_sample_format_and_seeded_reproducibility(tiny_model, tmp_path):
    prompts = write_jsonl([{"prompt": "Review of Kalo:"}, {"prompt": "Review of Mirento:"},
                           {"prompt": [{"role": "user", "content": "Review of Sa?"}]}], tmp_path / "p.jsonl")
    args = ["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "6",
            "--batch-size", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a.jsonl"), "--seed", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "b.jsonl"), "--seed", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "c.jsonl"), "--seed", "2"]) == 0
    a, b, c = _lines(tmp_path / "a.jsonl"), _lines(tmp_path / "b.jsonl"), _lines(tmp_path / "c.jsonl")
    assert len(a) == 9
    assert [(x["prompt_index"], x["index"]) for x in a] == [(i, j) for i in range(3) for j in range(3)]
    assert [x["prompt"] for x in a][::3] == ["Review of Kalo:", "Review of Mirento:",
                                              [{"role": "user", "content": "Review of Sa?"}]]
    assert all(isinstance(x["completion"], str) and 0 <= x["completion_tokens"] <= 6 for x in a)
    assert a == b  # same seed, same samples
    assert [x["completion"] for x in a] != [x["completion"] for x in c]
    assert len({x["completion"] for x in a}) > 3  # samples, not one greedy answer repeated


def test_left_padding_does_not_change_greedy_completions(tiny_model, tiny_tokenizer):
    model = load_model(str(tiny_model))
    short = encode_prompt("Review of Ka:", tiny_tokenizer)
    long = encode_prompt("Review of Kalomirentosavel, a film I found moving, clever and", tiny_tokenizer)
    alone = generate_completions(model, tiny_tokenizer, [short], max_new_tokens=8, temperature=0.0)
    batched = generate_completions(model, tiny_tokenizer, [long, short], max_new_tokens=8, temperature=0.0)
    assert batched[1] == alone[0]
    assert len(alone[0]) == 8 or alone[0][-1] == tiny_tokenizer.eos_token_id


def test_prompts_from_preference_files_and_errors(tiny_model, tmp_path, capsys):
    rows, _ = review_task(n_train=3, n_eval=1, seed=2)
    pairs = write_jsonl(rows, tmp_path / "pairs.jsonl")
    items = load_prompts(str(pairs))
    assert [it.prompt for it in items] == [r["prompt"] for r in rows]
    assert [it.reference for it in items] == [r["chosen"] for r in rows]  # chosen = the reference completion
    ranked = write_jsonl([{"prompt": "p", "responses": ["x", "y"], "scores": [0.1, 0.9]}], tmp_path / "r.jsonl")
    assert load_prompts(str(ranked))[0].reference == "y"
    with_ref = write_jsonl([{"prompt": "p", "reference": "r"}], tmp_path / "ref.jsonl")
    assert load_prompts(str(with_ref))[0].reference == "r"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl, line 2, field 'prompt'" in capsys.readouterr().err
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n{"prompt": "ok", "reference": 5}\n')
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "line 2, field 'prompt': missing" in capsys.readouterr().err
    assert len(load_prompts(str(bad), on_invalid="skip")) == 1
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_best_of_n_keeps_the_best(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "score_mod.py").write_text("def n_a(prompt, completion):\n    return completion.count('a')\n")
    rows, _ = review_task(n_train=5, n_eval=1, seed=3)
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(["bon", "--model", str(tiny_model), "--prompts", "pairs.jsonl", "--n", "4", "--reward-fn",
                 "score_mod:n_a", "--out", "bon.jsonl", "--max-new-tokens", "8", "--no-progress"]) == 0
    out = _lines(tmp_path / "bon.jsonl")
    assert [x["prompt_index"] for x in out] == list(range(5))
    for x in out:
        assert len(x["rewards"]) == 4 and len(x["completions"]) == 4
        assert x["reward"] == max(x["rewards"]) == x["rewards"][x["index"]]
        assert x["completion"] == x["completions"][x["index"]]
        assert x["reward"] == x["completion"].count("a")
        # every stored reward is its own completion's: the best is picked among the right values
        assert x["rewards"] == [c.count("a") for c in x["completions"]]
    # the 4 samples of some prompt differ in reward, so picking the best is a real choice (with the
    # checks above, best-of-4 then beats single samples strictly on average)
    assert any(len(set(x["rewards"])) > 1 for x in out)


def test_draw_samples_counts(tiny_model, tiny_tokenizer):
    items = [PromptItem("Review of Ka:"), PromptItem("X")]
    s = draw_samples(load_model(str(tiny_model)), tiny_tokenizer, items, n=2, max_new_tokens=3, seed=0)
    assert len(s.texts) == 4 and s.prompts == ["Review of Ka:"] * 2 + ["X"] * 2
    assert all(1 <= len(c) <= 3 for c in s.completion_ids)
    with pytest.raises(ValueError, match="n must be"):
        draw_samples(load_model(str(tiny_model)), tiny_tokenizer, items, n=0)


def test_next_token_samples_the_softmax():
    from directpo.eval.sampling import next_token

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([next_token(logits.expand(4000, -1), 0.7, 1.0, g) for _ in range(10)])
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    p = torch.softmax(logits[0].double() / 0.7, -1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / draws.numel()).sqrt().max()  # within 4 s.e.
    assert torch.equal(next_token(logits, 0.0, 1.0, g), logits.argmax(-1))  # greedy
    # top-p: only the most likely tokens whose mass reaches top_p (here the top 2), renormalised
    sorted_p = p.sort(descending=True).values
    top_p = float(sorted_p[:2].sum()) - 1e-6
    nucleus = torch.cat([next_token(logits.expand(4000, -1), 0.7, top_p, g) for _ in range(5)])
    assert set(nucleus.tolist()) == set(p.argsort(descending=True)[:2].tolist())
    share = (nucleus == p.argmax()).double().mean()
    assert abs(share - sorted_p[0] / sorted_p[:2].sum()) < 0.03
