"""A reference with another vocabulary: refused by name (`directpo.models.check_vocab`) in `score`
and `eval`, instead of an IndexError deep in a forward."""
import json

import pytest
import torch

from directpo.cli import main
from directpo.models import check_vocab, load_model, load_tokenizer
from directpo.toy import review_task, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_with_rows(tiny_model, out, rows: int):
    """A random 1-layer Llama with `rows` vocabulary rows, saved with tiny_model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tiny_model))
    cfg = LlamaConfig(vocab_size=rows, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_vocab(tiny_model, tmp_path_factory):
    """(a model with fewer rows than the tokenizer has tokens, one with more rows than tiny_model)."""
    n = len(load_tokenizer(str(tiny_model)))
    base = tmp_path_factory.mktemp("vocab")
    return (_model_with_rows(tiny_model, base / "small", n - 100), _model_with_rows(tiny_model, base / "big", n + 8))


def test_check_vocab(tiny_model, tiny_tokenizer, other_vocab):
    small, big = other_vocab
    policy = load_model(str(tiny_model))
    check_vocab(tiny_tokenizer, policy, "pol")
    check_vocab(tiny_tokenizer, policy, "pol", load_model(str(tiny_model)), "ref")
    n = len(tiny_tokenizer)
    with pytest.raises(ValueError, match=rf"^small: the tokenizer has {n} tokens but the model's embedding has only "
                                         rf"{n - 100} rows: they do not belong together$"):
        check_vocab(tiny_tokenizer, load_model(str(small)), "small")
    with pytest.raises(ValueError, match=rf"^small: the tokenizer has {n} tokens"):
        check_vocab(tiny_tokenizer, policy, "pol", load_model(str(small)), "small")
    with pytest.raises(ValueError, match=rf"^big: policy and reference have different vocabulary sizes \(pol: {n}, "
                                         rf"big: {n + 8}\)"):
        check_vocab(tiny_tokenizer, policy, "pol", load_model(str(big)), "big")


def test_score_and_eval_refuse_a_reference_of_another_vocabulary(tiny_model, other_vocab, tmp_path, capsys):
    small, big = other_vocab
    rows, _ = review_task(n_train=4, n_eval=1, seed=3)
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    for ref, what in ((small, "the tokenizer has"), (big, "policy and reference have different vocabulary sizes")):
        out = tmp_path / f"s-{ref.name}.jsonl"
        assert main(["score", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--ref",
                     str(ref)]) == 2
        err = capsys.readouterr().err
        assert f"directpo score: error: {ref}: {what}" in err and "Traceback" not in err
        assert not out.exists()
    assert main(["eval", "--model", str(tiny_model), "--ref", str(big), "--prompts", str(data), "--out",
                 str(tmp_path / "e.json"), "--reward-fn", "directpo.eval.scorers:review_sentiment", "--n", "1",
                 "--max-new-tokens", "2", "--no-progress"]) == 2
    assert f"{big}: policy and reference have different vocabulary sizes" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    # the same tokenizer and vocabulary: scored as before
    out = tmp_path / "ok.jsonl"
    assert main(["score", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--ref",
                 str(tiny_model)]) == 0
    assert [json.loads(line)["chosen_reward"] for line in open(out)] == [0.0] * 4
