"""`directpo sample` (and what samples through `eval.sample.draw_samples`: bon, eval) on prompts the model
cannot read."""
import json
import shutil

from directpo.cli import main


def test_a_prompt_past_the_models_context_is_refused_naming_it(tiny_model, tmp_path, capsys):
    """A prompt longer than the model's positions (max_position_embeddings 2048) was sampled: a RoPE
    model reads positions it never learned and writes nonsense, reported as a success (a model with
    learned positions: an IndexError). Now one line naming the row and the flag that cuts it."""
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "short"}, {"prompt": "the film was good " * 700}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.jsonl"
    argv = ["sample", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl, line 2" in err[0] and "2048" in err[0] and "--max-prompt-length" in err[0], err
    assert not out.exists()
    assert main(argv + ["--max-prompt-length", "512"]) == 0  # cut from the left: sampled
    assert len(out.read_text().splitlines()) == 2


def test_a_conversational_prompt_without_a_chat_template_names_its_row(tiny_model, tmp_path, capsys):
    from directpo.models import load_tokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    tok = load_tokenizer(str(model))
    tok.chat_template = None
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "text"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"),
                 "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl, line 2" in err[0] and "no chat template" in err[0], err


# ----------------------------------------------------------------------------------------------
# Written as it goes, resumed: `eval.partial`, `sample.draw_resumably`

PROMPTS = ["the film", "a long review of the movie that", "it was", "x", "the acting and the plot were", "good",
           "bad bad", "so"]
SAMPLE = ["--n", "3", "--max-new-tokens", "4", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--no-progress"]


def prompt_file(tmp_path, prompts=PROMPTS):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def completed_by_batch(tokenizer, prompts: list[str], n: int, batch_size: int) -> list[list[int]]:
    """The prompts each batch of the sampler's plan completes (all n samples drawn), batch by batch."""
    from directpo.data.prompts import PromptItem
    from directpo.eval.sample import encode_samples
    from directpo.eval.sampling import _windows

    ids = encode_samples(tokenizer, [PromptItem(p) for p in prompts], n)
    left, groups = [n] * len(prompts), []
    for w0, _, parts in _windows([len(p) for p in ids], batch_size):
        for part in parts:
            for i in part:
                left[(w0 + i) // n] -= 1
            groups.append(sorted({(w0 + i) // n for i in part if not left[(w0 + i) // n]}))
    return groups


def interrupt_after(monkeypatch, batches: int, error=KeyboardInterrupt):
    """The sampler raises `error` when asked for batch `batches` + 1; returns the list of batches asked for."""
    from directpo.eval import sampling

    real, calls = sampling.sample_batch, []

    def batch(*a, **kw):
        calls.append(len(a[1]))
        if len(calls) > batches:
            raise error()
        return real(*a, **kw)
    monkeypatch.setattr(sampling, "sample_batch", batch)
    return calls


def test_a_prompts_samples_depend_on_its_place_in_the_run(tiny_model, tiny_tokenizer):
    """Seeding, what the resume rests on: a sample's random numbers are fixed by its place in the whole
    run (batch b: generator seed + b), not by (seed, prompt, sample) alone, so prompts 5..7 sampled as
    a run of their own are not rows 5..7 of the run of 0..7 (if this ever holds, per-prompt seeding
    became independent). A run that skips batches (a resumed one) draws the others exactly as the
    full run does."""
    from directpo.data.prompts import PromptItem
    from directpo.eval.sample import encode_samples
    from directpo.eval.sampling import generate_completions
    from directpo.models import load_model

    model = load_model(str(tiny_model))
    ids = encode_samples(tiny_tokenizer, [PromptItem(p) for p in PROMPTS], 3)
    full = generate_completions(model, tiny_tokenizer, ids, 4, seed=3, batch_size=2)
    alone = generate_completions(model, tiny_tokenizer, ids[15:], 4, seed=3, batch_size=2)
    assert alone != full[15:]
    seen = []
    part = generate_completions(model, tiny_tokenizer, ids, 4, seed=3, batch_size=2, skip=lambda idx: 0 in idx,
                                on_batch=lambda idx, comps: seen.extend(idx))
    assert 0 not in seen and len(seen) == len(ids) - 2
    assert all(part[k] == full[k] for k in seen) and part[0] == []


def test_an_interrupted_sample_run_continues_to_the_same_file(tiny_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C after 2 batches: the prompts those batches completed are kept in <out>.partial (and
    only they), the message says so; the same command then samples only the batches holding the
    others, and writes the file an uninterrupted run writes, byte for byte."""
    from directpo.models import load_tokenizer

    argv = ["sample", "--model", str(tiny_model), "--prompts", str(prompt_file(tmp_path))] + SAMPLE
    assert main(argv + ["--out", str(tmp_path / "whole.jsonl")]) == 0
    assert not (tmp_path / "whole.jsonl.partial").exists()
    out, partial = tmp_path / "s.jsonl", tmp_path / "s.jsonl.partial"
    calls = interrupt_after(monkeypatch, 2)
    assert main(argv + ["--out", str(out)]) == 130
    groups = completed_by_batch(load_tokenizer(str(tiny_model)), PROMPTS, 3, 2)
    kept = groups[0] + groups[1]
    assert kept  # (2 batches of 2 rows complete a prompt of 3 samples)
    err = capsys.readouterr().err
    assert f"{len(kept)} of 8 prompts done, kept in {partial}: rerun the same command to continue" in err
    assert not out.exists()
    whole = (tmp_path / "whole.jsonl").read_text().splitlines()
    rows = partial.read_text().splitlines()
    assert json.loads(rows[0])["settings"]["seed"] == 3
    assert sorted(rows[1:]) == sorted(r for r in whole if json.loads(r)["prompt_index"] in kept)
    monkeypatch.undo()
    calls = interrupt_after(monkeypatch, 10**6)
    assert main(argv + ["--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert not partial.exists() and len(calls) < 12  # resumed: not all 12 batches again
    assert f"{len(kept)} of 8 prompts done by an earlier run" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_over(tiny_model, tmp_path, monkeypatch,
                                                                          capsys):
    argv = ["sample", "--model", str(tiny_model), "--prompts", str(prompt_file(tmp_path)), "--out",
            str(tmp_path / "s.jsonl")] + SAMPLE
    interrupt_after(monkeypatch, 2)
    assert main(argv) == 130
    partial = tmp_path / "s.jsonl.partial"
    before = partial.read_bytes()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv + ["--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "s.jsonl.partial holds samples of another run: --temperature was 1.0, now 0.7" in err
    assert "--overwrite" in err
    assert partial.read_bytes() == before
    prompt_file(tmp_path, PROMPTS[:-1] + ["changed"])
    assert main(argv) == 2
    assert "the content of --prompts" in capsys.readouterr().err
    calls = interrupt_after(monkeypatch, 10**6)
    assert main(argv + ["--overwrite"]) == 0
    assert len(calls) == 12 and not partial.exists()  # all 12 batches of the changed file: started over
    assert "deleted" in capsys.readouterr().err
