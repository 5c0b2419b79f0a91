"""Ground-truth sentiment scorers: VADER (offline default) and any HF sequence classifier."""
import pytest
import torch

from directpo.eval.scorers import ClassifierReward, callable_scorer, vader_sentiment


def test_vader_scores_the_whole_review():
    pytest.importorskip("vaderSentiment")
    assert vader_sentiment("The film was", " wonderful, moving and brilliant") > 0.5
    assert vader_sentiment("The film was", " dull, awful and boring") < -0.5
    # the prompt is part of the review: the same completion reads differently after another prompt
    assert vader_sentiment("I hated it.", " The end.") < vader_sentiment("I loved it.", " The end.")
    score = callable_scorer(vader_sentiment)
    assert score(["a", [{"role": "user", "content": "a"}]], [" great", " great"])[0] == pytest.approx(
        score(["a", "a"], [" great", " great"])[1])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model):
    """A tiny random Llama sequence classifier with NEGATIVE/POSITIVE labels, saved in HF format."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from directpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id, num_labels=2,
                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clf") / "model"
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_classifier_reward_is_p_positive(classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = ClassifierReward(str(classifier), device="cpu", batch_size=2)
    prompts, comps = ["Review of Kalo:", "Review of Mi:", "A"], [" It was great.", " dull and flat", " ok"]
    got = scorer(prompts, comps)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    tok = AutoTokenizer.from_pretrained(classifier)
    for p, c, g in zip(prompts, comps, got):  # one at a time, unpadded: batching must not change the score
        with torch.no_grad():
            want = model(**tok(p + c, return_tensors="pt")).logits.softmax(-1)[0, 1].item()
        assert g == pytest.approx(want, abs=1e-5)
    assert ClassifierReward(str(classifier), device="cpu", positive_label="negative")(prompts[:1], comps[:1])[0] == \
        pytest.approx(1 - got[0], abs=1e-5)
    with pytest.raises(ValueError, match="no class named 'joy'"):
        ClassifierReward(str(classifier), device="cpu", positive_label="joy")


def test_ppo_refuses_a_reference_of_another_vocabulary(tiny_model, tmp_path, capsys):
    """`ppo --ref` with more vocabulary rows than the policy: one line naming both, before any step
    (an IndexError or silently compared log-probs otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from directpo.cli import main
    from directpo.models import load_tokenizer
    from directpo.toy import review_task, write_jsonl

    tok = load_tokenizer(str(tiny_model))
    ref = tmp_path / "big"
    cfg = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(ref)
    tok.save_pretrained(ref)
    rows, _ = review_task(n_train=4, n_eval=1, seed=4)
    prompts = write_jsonl([{"prompt": r["prompt"]} for r in rows], tmp_path / "prompts.jsonl")
    rc = main(["ppo", "--model", str(tiny_model), "--ref", str(ref), "--prompts", str(prompts), "--output-dir",
               str(tmp_path / "ppo"), "--reward-fn", "directpo.eval.scorers:review_sentiment", "--batch-size", "2",
               "--mini-batch-size", "2", "--max-steps", "1", "--max-new-tokens", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{ref}: policy and reference have different vocabulary sizes ({tiny_model}: {len(tok)}, " \
                       f"{ref}: {len(tok) + 8})" in err
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists() or not (tmp_path / "ppo" / "metrics.jsonl").read_text()
