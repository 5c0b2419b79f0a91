"""A suppressed token (`--fixed-length`, #31 item 4): every reader of the model's logits sees π', π
renormalised over the vocabulary without that token — the fused LM head (values and gradients), the
model's own logits, PPO's log-probs and entropy, and the sampler, which never draws it."""
import dataclasses

import pytest
import torch
from torch import nn

from directpo.data import Example, collate_padded, tokenize_example
from directpo.eval.sampling import generate_completions
from directpo.logprobs import sequence_logps
from directpo.models import load_model, suppress_token, suppressed_token
from directpo.rlhf.ppo import policy_forward


def renormalised_sequence_logps(model, batch, banned: int) -> torch.Tensor:
    """The textbook π': full logits, log π − log(1 − π(banned)) at every label, summed per row."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    logp = logp - torch.log1p(-logp[..., banned].exp())[..., None]
    tok = logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(-1)
    T = batch.input_ids.shape[1]
    mask = torch.zeros_like(tok, dtype=torch.bool)
    mask.view(-1)[batch.label_pos - batch.label_pos // T] = True
    return (tok * mask).sum(1)


@pytest.fixture
def banned_setup(tiny_model, tiny_tokenizer):
    """A batch whose responses carry no EOS (as fixed-length completions do), the model, EOS's id."""
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat."], "t", 1)]
    eos = tiny_tokenizer.eos_token_id
    tok = [tokenize_example(e, tiny_tokenizer) for e in exs]
    tok = [dataclasses.replace(t, response_ids=[r[:-1] if r[-1] == eos else r for r in t.response_ids]) for t in tok]
    assert all(eos not in r for t in tok for r in t.response_ids)
    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    return collate_padded(tok, tiny_tokenizer.pad_token_id), model, eos


def test_suppressed_log_probs_are_the_renormalised_ones_values_and_gradients(banned_setup):
    batch, model, eos = banned_setup
    plain = sequence_logps(model, batch).detach()
    suppress_token(model, eos)
    assert suppressed_token(model) == eos == suppressed_token(model.get_output_embeddings())
    w = torch.linspace(-1, 1, 4)

    def grads(fn):
        model.zero_grad()
        out = fn()
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (want, g_want) = grads(lambda: renormalised_sequence_logps(model, batch, eos))
    for fused in (True, False):
        got, g_got = grads(lambda: sequence_logps(model, batch, fused=fused))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (fused, got, want)
        for name in g_want:
            assert torch.allclose(g_got[name], g_want[name], atol=1e-5, rtol=1e-4), (fused, name)
    # π' gives every kept token more probability than π did: each sequence's log-prob rises
    assert (want > plain).all()
    # the mark is the run's, not the model's: not in the weights, and it can be cleared
    assert not any("suppress" in k for k in model.state_dict())
    suppress_token(model, None)
    assert suppressed_token(model) is None
    assert torch.allclose(sequence_logps(model, batch).detach(), plain, atol=1e-6)


def test_ppo_log_probs_and_entropy_are_the_renormalised_distributions(banned_setup):
    batch, model, eos = banned_setup
    suppress_token(model, eos)
    value_head = nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        logp, _, ent = policy_forward(model, value_head, batch, entropy=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.label_pos)
        rows[:, eos] = -float("inf")
        want = torch.log_softmax(rows, -1)
        p = want.exp()
        want_ent = -(p * want.masked_fill(p == 0, 0)).sum(-1)
    assert torch.allclose(logp, want.gather(1, batch.label_ids[:, None]).squeeze(1), atol=1e-5)
    assert torch.isfinite(ent).all() and torch.allclose(ent, want_ent, atol=1e-4)


def test_the_sampler_never_draws_the_suppressed_token(tiny_model, tiny_tokenizer):
    model = load_model(str(tiny_model))
    eos = tiny_tokenizer.eos_token_id
    prompts = [tiny_tokenizer("Review of Kalo:")["input_ids"], tiny_tokenizer("Hi")["input_ids"]] * 8
    # Make EOS the likeliest token everywhere: unsuppressed, most rows stop at once
    head = model.get_output_embeddings()
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[eos] = 20.0
    free = generate_completions(model, tiny_tokenizer, prompts, max_new_tokens=12, seed=1)
    assert sum(len(c) < 12 for c in free) >= 8 and any(eos in c for c in free)
    suppress_token(model, eos)
    for temperature in (0.0, 1.0):
        fixed = generate_completions(model, tiny_tokenizer, prompts, max_new_tokens=12, seed=1,
                                     temperature=temperature)
        assert all(len(c) == 12 and eos not in c for c in fixed)


# ---- --fixed-length through the commands: tokenization, train, sample, eval, ppo ----

def test_fixed_length_rows_get_no_eos_and_a_response_that_ends_is_refused(tiny_tokenizer):
    from directpo.data import DataError

    eos = tiny_tokenizer.eos_token_id
    ex = Example("Review of Kalo:", [" It was great.", " It was dull."], "d.jsonl", 7)
    plain, fixed = tokenize_example(ex, tiny_tokenizer), tokenize_example(ex, tiny_tokenizer, fixed_length=True)
    assert all(r[-1] == eos for r in plain.response_ids)
    assert fixed.response_ids == [r[:-1] for r in plain.response_ids] and fixed.prompt_ids == plain.prompt_ids
    ends = Example("Review of Kalo:", [" It was great.", " dull" + tiny_tokenizer.eos_token + " more"], "d.jsonl", 7)
    if eos in tokenize_example(ends, tiny_tokenizer).response_ids[1][:-1]:  # the tokenizer reads its EOS text
        with pytest.raises(DataError, match=r"holds the EOS token") as e:
            tokenize_example(ends, tiny_tokenizer, fixed_length=True)
        assert (e.value.source, e.value.row, e.value.field) == ("d.jsonl", 7, "rejected")
    with pytest.raises(DataError, match="empty") as e:
        tokenize_example(Example("Hi", ["", " no"], "d.jsonl", 3), tiny_tokenizer, fixed_length=True)
    assert e.value.field == "chosen"
    chat = Example([{"role": "user", "content": "Hi"}], [[{"role": "assistant", "content": "a"}],
                                                          [{"role": "assistant", "content": "b"}]], "d.jsonl", 2)
    with pytest.raises(DataError, match="conversational"):
        tokenize_example(chat, tiny_tokenizer, fixed_length=True)


def test_the_reference_tables_key_tells_the_suppressed_model_apart(tiny_model, tiny_tokenizer):
    from directpo.models import suppress_eos
    from directpo.reference import model_fingerprint

    model = load_model(str(tiny_model))
    before = model_fingerprint(model)
    suppress_eos(model, tiny_tokenizer)
    assert model_fingerprint(model) != before
    suppress_token(model, None)
    assert model_fingerprint(model) == before  # (no mark: every cache written before stays valid)


def test_train_sample_and_eval_with_fixed_length(tiny_model, tmp_path):
    import json

    from conftest import review_pairs, train_argv

    from directpo.cli import main

    from directpo import api
    from directpo.models import load_tokenizer
    from directpo.training.run import Callback

    data = review_pairs(tmp_path, n_train=8)
    assert main(train_argv(tiny_model, data, tmp_path / "run", "--max-steps", "2", "--fixed-length")) == 0
    metrics = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2]
    # πref' (its precomputed table) and π' agree at step 1: a reference read with π would make these ≠ 0
    assert metrics[0]["rewards/chosen"] == 0.0 == metrics[0]["rewards/rejected"]
    # in the step loop the policy is π' (EOS suppressed); afterwards a caller's model object is theirs again
    model, tok, seen = load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), []

    class Look(Callback):
        def on_step(self, record):
            seen.append(suppressed_token(model))

    api.train(model=model, tokenizer=tok, data=str(data), output_dir=str(tmp_path / "api"), max_steps=2,
              batch_size=4, micro_batch_size=4, max_length=64, warmup_steps=0, progress=False, threads=1,
              fixed_length=True, callbacks=[Look()])
    assert seen == [tok.eos_token_id] * 2 and suppressed_token(model) is None
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Review of Kalo:", "Review of Sa:")))
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(tmp_path / "run"), "--prompts", str(prompts), "--out", str(out), "--n", "4",
                 "--max-new-tokens", "7", "--no-progress", "--fixed-length"]) == 0
    rows = [json.loads(x) for x in open(out)]
    assert len(rows) == 8 and all(r["completion_tokens"] == 7 and not r["finished"] for r in rows)
    # KL(π'‖πref') of a model against itself is exactly 0; the results say the completions were fixed-length
    from directpo.eval.evaluate import evaluate_policy

    result = evaluate_policy(str(tiny_model), str(prompts), str(tmp_path / "e.json"), ref=str(tiny_model),
                             reward=lambda p, c: float(c.count("e")), n=4, max_new_tokens=5,
                             progress=False, fixed_length=True)
    assert result["fixed_length"] is True and result["kl_mean"] == 0.0 and result["length_mean"] == 5


def test_ppo_with_fixed_length_rolls_out_to_max_new_tokens(tiny_model, tmp_path):
    import json
    import math

    from directpo.rlhf.config import PPOConfig
    from directpo.rlhf.ppo import ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review of {n}:"}) + "\n" for n in ("Kalo", "Sa", "Mi", "Bo")))
    cfg = PPOConfig(model=str(tiny_model), prompts=str(prompts), output_dir=str(tmp_path / "ppo"), lr=1e-3,
                    batch_size=4, mini_batch_size=2, ppo_epochs=1, max_steps=2, max_new_tokens=6, seed=0,
                    progress=False, log_every=100, fixed_length=True)
    ppo(cfg, reward=lambda prompt, completion: float(completion.count("e")))
    m = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [x["length_mean"] for x in m] == [6.0, 6.0]
    assert m[0]["kl"] == 0.0 and all(math.isfinite(x["entropy"]) for x in m)


def test_score_with_fixed_length_gives_the_renormalised_log_probs(tiny_model, tiny_tokenizer, tmp_path):
    import json

    from conftest import review_pairs

    from directpo import api
    from directpo.data import load_examples

    data = review_pairs(tmp_path, n_train=4)
    api.score(model=str(tiny_model), data=str(data), out=str(tmp_path / "s.jsonl"), ref=str(tiny_model),
              fixed_length=True, precision="fp32")
    lines = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    rows = [tokenize_example(ex, tiny_tokenizer, max_length=512, fixed_length=True) for ex in load_examples(str(data))]
    with torch.no_grad():
        want = renormalised_sequence_logps(load_model(str(tiny_model)), collate_padded(rows, tiny_tokenizer.pad_token_id),
                                           tiny_tokenizer.eos_token_id)
    got = torch.tensor([[x["chosen_logp"], x["rejected_logp"]] for x in lines])
    want = want.reshape(2, -1).T  # (collate_padded puts every chosen sequence first, then every rejected)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert all(x["chosen_reward"] == 0.0 == x["rejected_reward"] for x in lines)
    assert all(x["chosen_tokens"] == len(r.response_ids[0]) for x, r in zip(lines, rows))


def test_a_tokenizer_without_eos_is_a_one_line_error(tiny_model, tiny_tokenizer):
    from directpo.errors import UserValueError
    from directpo.models import suppress_eos

    model, tok = load_model(str(tiny_model)), type("NoEos", (), {"eos_token_id": None})()
    with pytest.raises(UserValueError, match="--fixed-length: the tokenizer has no EOS token"):
        suppress_eos(model, tok)
    suppress_eos(model, tok, on=False)  # (off: nothing asked of the tokenizer)
    assert suppressed_token(model) is None
