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
