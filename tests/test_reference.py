"""The on-disk reference log-prob cache: hits when nothing changed, recomputes when anything did."""
import json

import pytest
import torch

from directpo.data import make_collate, parse_row, tokenize_examples
from directpo.logprobs import dataset_logps
from directpo.models import load_model
from directpo.reference import model_fingerprint, reference_logps
from directpo.toy import review_task, write_jsonl
from directpo.train import TrainConfig, train


@pytest.fixture
def setup(tiny_model, tiny_tokenizer):
    rows, _ = review_task(n_train=12, n_eval=1, seed=11)
    examples = [parse_row(r, "t", i) for i, r in enumerate(rows)]
    calls = []
    collate = make_collate("packed", tiny_tokenizer.pad_token_id)

    def compute(model, exs):
        calls.append(len(exs))
        return dataset_logps(model, exs, collate)

    return load_model(str(tiny_model)), examples, compute, calls


def test_hit_and_invalidation(setup, tiny_tokenizer, tmp_path):
    model, examples, compute, calls = setup
    tok = tokenize_examples(examples, tiny_tokenizer, max_length=64)
    t1, hit1 = reference_logps(model, tok, compute, cache_dir=tmp_path)
    t2, hit2 = reference_logps(model, tok, compute, cache_dir=tmp_path)
    assert (hit1, hit2) == (False, True) and calls == [12]
    assert torch.equal(t1, t2)
    # a changed datum
    changed = list(examples)
    changed[3] = parse_row({"prompt": "Review of Zed:", "chosen": " superb", "rejected": " awful"}, "t", 3)
    reference_logps(model, tokenize_examples(changed, tiny_tokenizer, max_length=64), compute, cache_dir=tmp_path)
    # a changed max_length (truncates some responses)
    reference_logps(model, tokenize_examples(examples, tiny_tokenizer, max_length=12), compute, cache_dir=tmp_path)
    # a changed precision
    reference_logps(model, tok, compute, precision="bf16", cache_dir=tmp_path)
    # a changed weight
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    reference_logps(model, tok, compute, cache_dir=tmp_path)
    assert len(calls) == 5
    # ... and all of them are now cached
    reference_logps(model, tok, compute, cache_dir=tmp_path)
    assert len(calls) == 5


def test_changed_tokenizer_changes_key(setup, tiny_tokenizer, tmp_path):
    model, examples, compute, calls = setup
    tok = tokenize_examples(examples, tiny_tokenizer, max_length=64)
    reference_logps(model, tok, compute, cache_dir=tmp_path)
    # another tokenizer = other ids for the same text (here: a shifted id map stands in for one)
    other = [type(t)(t.prompt_ids[:-1] + [t.prompt_ids[-1] % 500 + 1], t.response_ids, t.source, t.row) for t in tok]
    reference_logps(model, other, compute, cache_dir=tmp_path)
    assert len(calls) == 2


def test_fingerprint_sees_every_weight(tiny_model):
    a, b = load_model(str(tiny_model)), load_model(str(tiny_model))
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        list(b.parameters())[-1].view(-1)[-1] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_second_training_run_computes_no_reference_forward(tiny_model, tmp_path, capsys):
    rows, _ = review_task(n_train=16, n_eval=1, seed=2)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    kw = dict(model=str(tiny_model), data=str(data), batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-4,
              progress=False, max_length=64, ref_cache=str(tmp_path / "cache"))
    train(TrainConfig(output_dir=str(tmp_path / "a"), **kw))
    assert "computed and cached" in capsys.readouterr().err
    train(TrainConfig(output_dir=str(tmp_path / "b"), **kw))
    assert "cache hit" in capsys.readouterr().err
    la = [json.loads(x)["loss"] for x in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert la == lb
