"""The on-disk reference log-prob cache: hits when nothing changed, recomputes when anything did."""
import json

import pytest
import torch

from directpo.data import make_collate, parse_row, tokenize_examples
from directpo.logprobs import dataset_logps
from directpo.models import load_model
from directpo.reference import model_fingerprint, reference_logps
from directpo.toy import review_task, write_jsonl
from directpo.training import TrainConfig, train


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
    t3, hit3 = reference_logps(model, tokenize_examples(changed, tiny_tokenizer, max_length=64), compute,
                               cache_dir=tmp_path)
    assert not hit3 and calls[-1] == 1  # that row alone is computed; the others are the cached ones
    assert torch.equal(t3[[i for i in range(12) if i != 3]], t1[[i for i in range(12) if i != 3]])
    one = tokenize_examples(changed, tiny_tokenizer, max_length=64)[3:4]
    assert torch.allclose(t3[3], dataset_logps(model, one, make_collate("packed", tiny_tokenizer.pad_token_id))[0])
    # a changed max_length truncates some responses: their rows alone are computed
    cut = tokenize_examples(examples, tiny_tokenizer, max_length=12)
    reference_logps(model, cut, compute, cache_dir=tmp_path)
    assert calls[-1] == sum(a.response_ids != b.response_ids or a.prompt_ids != b.prompt_ids
                            for a, b in zip(cut, tok)) > 0
    # a changed precision: another file, every row
    reference_logps(model, tok, compute, precision="bf16", cache_dir=tmp_path)
    assert calls[-1] == 12
    # a changed weight: another file, every row
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    reference_logps(model, tok, compute, cache_dir=tmp_path)
    assert len(calls) == 5 and calls[-1] == 12
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


def test_an_edited_cache_file_is_recomputed_with_a_warning(setup, tiny_tokenizer, tmp_path):
    """A table whose numbers were changed on disk (by hand, a bad copy, a disk error) fails its
    checksum: it is recomputed, not trusted (the issue's edited file gave a step-1 loss of 5.0)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model, examples, compute, calls = setup
    tok = tokenize_examples(examples, tiny_tokenizer, max_length=64)
    msgs = []
    t1, _ = reference_logps(model, tok, compute, cache_dir=tmp_path, log=msgs.append)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    stored = load_file(str(path))
    edited = stored["logps"].clone()
    edited[0, 0] += 5.0
    save_file({"logps": edited, "keys": stored["keys"]}, str(path), metadata=meta)  # same key and checksum
    t2, hit = reference_logps(model, tok, compute, cache_dir=tmp_path, log=msgs.append)
    assert not hit and len(calls) == 2 and torch.equal(t1, t2)
    assert any("does not match its checksum" in m and str(path) in m for m in msgs)
    # the recomputed table replaced the edited one: the next run is a clean hit
    t3, hit = reference_logps(model, tok, compute, cache_dir=tmp_path, log=msgs.append)
    assert hit and torch.equal(t3, t1) and len(calls) == 2
    # a file copied under another key's name is not trusted either (its header names its own key)
    from directpo.reference import cache_key

    other = tmp_path / f"{cache_key(model_fingerprint(model), 'bf16')}.safetensors"
    other.write_bytes(path.read_bytes())
    assert reference_logps(model, tok, compute, precision="bf16", cache_dir=tmp_path, log=msgs.append)[1] is False
    assert len(calls) == 3


def test_rows_cached_by_a_short_run_serve_a_longer_one(setup, tiny_tokenizer, tmp_path):
    """A --max-steps run caches the rows it drew; the whole run after it computes only the others,
    and its table equals one computed from scratch (row by row, up to float re-association)."""
    model, examples, compute, calls = setup
    tok = tokenize_examples(examples, tiny_tokenizer, max_length=64)
    msgs = []
    first, _ = reference_logps(model, tok[2:7], compute, cache_dir=tmp_path, log=msgs.append)
    whole, hit = reference_logps(model, tok, compute, cache_dir=tmp_path, log=msgs.append)
    assert not hit and calls == [5, 7]
    assert f"5 of 12 rows from the cache {tmp_path}" in msgs[-1] and "7 computed and cached" in msgs[-1]
    assert torch.equal(whole[2:7], first)
    fresh = dataset_logps(model, tok, make_collate("packed", tiny_tokenizer.pad_token_id))
    assert torch.allclose(whole, fresh, rtol=1e-6, atol=1e-5, equal_nan=True)
    # all twelve are cached now, in one file
    again, hit = reference_logps(model, tok, compute, cache_dir=tmp_path, log=msgs.append)
    assert hit and torch.equal(again, whole) and len(calls) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_a_rankings_rows_keep_their_width_next_to_pairs(tiny_model, tiny_tokenizer, tmp_path):
    """Rows of 3-response rankings and of pairs share one file: each comes back as wide as asked."""
    from directpo.data import parse_row
    from directpo.toy import ranked_review_task

    model = load_model(str(tiny_model))
    collate = make_collate("packed", tiny_tokenizer.pad_token_id)
    ranked = [parse_row(r, "r", i) for i, r in enumerate(ranked_review_task(n_train=4, n_eval=1, k=3, seed=3)[0][:4])]
    pairs = [parse_row(r, "p", i) for i, r in enumerate(review_task(n_train=4, n_eval=1, seed=3)[0][:4])]
    rk, pr = (tokenize_examples(x, tiny_tokenizer, max_length=64) for x in (ranked, pairs))
    compute = lambda m, exs: dataset_logps(m, exs, collate)  # noqa: E731
    reference_logps(model, rk, compute, cache_dir=tmp_path)
    reference_logps(model, pr, compute, cache_dir=tmp_path)
    t_pairs, hit_p = reference_logps(model, pr, compute, cache_dir=tmp_path)
    t_rank, hit_r = reference_logps(model, rk, compute, cache_dir=tmp_path)
    assert hit_p and hit_r and t_pairs.shape == (4, 2) and t_rank.shape == (4, 3)
    assert not t_pairs.isnan().any() and not t_rank.isnan().any()


def test_an_image_rows_key_covers_its_pixels():
    """The same token ids about another picture are another row of the cache (issue #30): the key
    hashes the image tensors the processor made, not only the text."""
    from types import SimpleNamespace

    from directpo.reference import row_keys

    pixels = torch.rand(4, 12)
    grid = torch.tensor([[1, 2, 2]])

    def row(px):
        return SimpleNamespace(prompt_ids=[1, 2, 3], response_ids=[[4], [5]],
                               vision={"pixel_values": px, "image_grid_thw": grid})

    other = pixels.clone()
    other[2, 5] += 1e-6  # one value of one patch
    keys = row_keys([row(pixels), row(pixels.clone()), row(other),
                     SimpleNamespace(prompt_ids=[1, 2, 3], response_ids=[[4], [5]])])
    assert torch.equal(keys[0], keys[1])  # the same pixels: the same row
    assert not torch.equal(keys[0], keys[2])
    assert not torch.equal(keys[0], keys[3])  # the text alone: another row
