"""`directpo sample` and Best-of-N: output format, seeded reproducibility, left padding, prompt files."""
import json

import pytest
import torch

from directpo.cli import main
from directpo.data.prompts import PromptItem, encode_prompt, load_prompts
from directpo.eval.sample import draw_samples
from directpo.eval.sampling import generate_completions
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


# ------------------------------------------------------------------------------------------------
# The fast sampler (shared prefill, finished rows leaving, length buckets, a preallocated cache):
# the same distribution, and the same samples as the plain loop


PROMPTS = ["Review of Ka:", "Review of Kalomirentosavel, a film I found moving, clever and", "X",
           "Review of Mi: it was", "Review of Ka:", "Review of Sa, which"]


def _eos_prone(tiny_model, tiny_tokenizer, bias: float = 3.5):
    """The tiny model with a bias on EOS's logit, so rows end (at different steps) within a few tokens."""
    model = load_model(str(tiny_model))
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    new.weight.data = head.weight.data.clone()
    new.bias.data.zero_()
    new.bias.data[tiny_tokenizer.eos_token_id] = bias
    model.lm_head = new
    return model.eval()


@torch.no_grad()
def _plain_loop(model, prompts, max_new_tokens, seed, batch_size, eos, pad):
    """The sampler before the speed-ups: input order, batch b left-padded, every row decoded to the
    end (or until all ended), the cache concatenated, uniforms drawn step by step from seed + b."""
    from transformers import DynamicCache

    out = []
    for b, s in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[s:s + batch_size]
        P = max(map(len, chunk))
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk])
        gen = torch.Generator().manual_seed(seed + b)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]
        rows, done = [[] for _ in chunk], torch.zeros(len(chunk), dtype=torch.bool)
        for t in range(max_new_tokens):
            cdf = torch.softmax(logits.double(), -1).cumsum(-1)
            u = torch.rand(len(chunk), 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
            for i in range(len(chunk)):
                if not done[i]:
                    rows[i].append(int(tok[i]))
            done |= tok == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]
        out += rows
    return out


def test_fast_sampler_gives_the_plain_loops_samples(tiny_model, tiny_tokenizer):
    """Fixed-seed samples are unchanged by the speed-ups: prompts of many lengths, repeats (shared
    prefill), rows ending at different steps (they leave), batches re-formed by length."""
    model = _eos_prone(tiny_model, tiny_tokenizer)
    ids = [encode_prompt(p, tiny_tokenizer) for p in PROMPTS]
    prompts = [p for p in ids for _ in range(3)]
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for seed, batch in ((0, 4), (5, 7)):
        fast = generate_completions(model, tiny_tokenizer, prompts, max_new_tokens=10, seed=seed, batch_size=batch)
        assert fast == _plain_loop(model, prompts, 10, seed, batch, eos, pad)
    lengths = [len(c) for c in fast]
    assert min(lengths) < 5 and max(lengths) == 10  # rows did end early, at different steps, and some ran on
    assert sum(c[-1] == eos for c in fast) > len(fast) // 3


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sharing_and_leaving_change_no_sample(tiny_model, tiny_tokenizer, kv_heads, monkeypatch):
    """For the same uniforms, a prompt's keys computed and stored once for its K rows (one attention
    over the shared prompt, grouped-query heads too) equal K separate prefills, and dropping ended
    rows equals decoding them to the end."""
    from directpo.eval import sampling
    from directpo.eval.sampling import sample_batch

    model = _eos_prone(tiny_model, tiny_tokenizer)
    if kv_heads != model.config.num_key_value_heads:  # the same model with grouped-query attention
        from transformers import AutoModelForCausalLM

        config = model.config
        config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        gqa = AutoModelForCausalLM.from_config(config).eval()
        gqa.lm_head = model.lm_head
        model = gqa
    shared = []
    groups = sampling._groups
    monkeypatch.setattr(sampling, "_groups", lambda rows: shared.append(rows) or groups(rows))
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    prompts = [encode_prompt(PROMPTS[i], tiny_tokenizer) for i in (0, 0, 0, 1, 1, 2, 0, 3)]
    u = torch.rand(len(prompts), 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    runs = {(share, drop): sample_batch(model, prompts, 12, 1.0, 1.0, eos, pad, uniforms=u, share_prefix=share,
                                        drop_finished=drop) for share in (True, False) for drop in (True, False)}
    first = runs[True, True]
    assert all(r == first for r in runs.values())
    assert shared and shared[0] == [0, 0, 0, 1, 1, 2, 0, 3]  # the shared attention ran, rows by prompt
    assert len({len(c) for c in first}) > 2 and any(c[-1] == eos for c in first)  # rows ended at different steps
    assert first[0] != first[1]  # repeats of a prompt are separate samples


def test_repeats_of_a_prompt_are_prefilled_once(tiny_model, tiny_tokenizer, monkeypatch):
    from directpo.eval import sampling

    seen = []
    forward = sampling._forward
    monkeypatch.setattr(sampling, "_forward", lambda model, **kw: seen.append(kw["input_ids"].shape) or
                        forward(model, **kw))
    items = [PromptItem("Review of Ka:"), PromptItem("Review of Mirento, a film")]
    s = draw_samples(load_model(str(tiny_model)), tiny_tokenizer, items, n=4, max_new_tokens=3, batch_size=8)
    assert len(s.completion_ids) == 8
    prefill = seen[0]
    assert prefill[0] == 2 and prefill[1] == max(len(p) for p in s.prompt_ids)  # two rows for eight samples
    assert all(shape[1] == 1 for shape in seen[1:])  # then one token per row and step


def test_sampled_tokens_have_the_models_logprobs(tiny_model, tiny_tokenizer, monkeypatch):
    """Every step's distribution is π's: the log-probability each token was drawn with equals a
    separate forward pass over the unpadded prompt + completion (within 1e-5), rows leaving or not."""
    from directpo.eval import sampling

    model = _eos_prone(tiny_model, tiny_tokenizer)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    prompts = [encode_prompt(PROMPTS[i], tiny_tokenizer) for i in (1, 1, 0, 0, 0, 2, 3, 1)]  # shared prompts
    T = 8
    U = torch.rand(len(prompts), T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    drawn: dict[tuple[int, int], float] = {}  # (row, step) -> log-prob of the token drawn
    nt = sampling.next_token

    def recording(logits, *args, u=None, **kw):
        tok = nt(logits, *args, u=u, **kw)
        t = len({step for _, step in drawn})
        lp = torch.log_softmax(logits.double(), -1).gather(1, tok[:, None]).squeeze(1)
        for v, x in zip(u.tolist(), lp.tolist()):  # a row is known by its uniform
            drawn[U[:, t].tolist().index(v), t] = x
        return tok

    monkeypatch.setattr(sampling, "next_token", recording)
    for drop in (True, False):
        drawn.clear()
        comps = sampling.sample_batch(model, prompts, T, 1.0, 1.0, eos, pad, uniforms=U, drop_finished=drop)
        assert len({len(c) for c in comps}) > 2  # rows ended at different steps
        with torch.no_grad():
            for i, (p, c) in enumerate(zip(prompts, comps)):
                logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()
                want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
                assert [drawn[i, t] for t in range(len(c))] == pytest.approx(want.tolist(), abs=1e-5)
        # with rows leaving, an ended row is no longer decoded (here: no draw for it after its EOS + 1 step)
        ended = [i for i, c in enumerate(comps) if len(c) < T - 2]
        assert ended and (not drop or all((i, T - 1) not in drawn for i in ended)) and \
            (drop or all((i, T - 1) in drawn for i in ended))


def test_greedy_equals_transformers_generate(tiny_model, tiny_tokenizer):
    """At temperature 0 the sampler is greedy decoding: transformers' `generate` gives the same tokens."""
    from transformers import GenerationConfig

    model = load_model(str(tiny_model)).eval()
    ids = [encode_prompt(p, tiny_tokenizer) for p in PROMPTS]
    ours = generate_completions(model, tiny_tokenizer, ids, max_new_tokens=8, temperature=0.0, batch_size=3)
    gc = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=tiny_tokenizer.pad_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id)
    for p, mine in zip(ids, ours):
        with torch.no_grad():
            theirs = model.generate(input_ids=torch.tensor([p]), generation_config=gc)[0, len(p):].tolist()
        assert mine == theirs
    assert len({tuple(c) for c in ours}) > 1


def test_bucketing_restores_the_input_order(tiny_model, tiny_tokenizer, monkeypatch):
    """Prompts are sampled longest first within a window, and each completion lands at its own index."""
    from directpo.eval import sampling

    model = load_model(str(tiny_model))
    ids = [encode_prompt(p, tiny_tokenizer) for p in PROMPTS]
    batches = []
    sb = sampling.sample_batch
    monkeypatch.setattr(sampling, "sample_batch", lambda m, prompts, *a, **k: batches.append(prompts) or
                        sb(m, prompts, *a, **k))
    together = generate_completions(model, tiny_tokenizer, ids, max_new_tokens=6, temperature=0.0, batch_size=2)
    lengths = [len(p) for b in batches for p in b]
    assert lengths == sorted(lengths, reverse=True) and lengths != [len(p) for p in ids]  # really reordered
    alone = [generate_completions(model, tiny_tokenizer, [p], max_new_tokens=6, temperature=0.0)[0] for p in ids]
    assert together == alone


def test_repeats_share_keys_only_where_the_copies_would_be_many(tiny_model, monkeypatch):
    """`shares_keys`: short prompts repeated a few times are copied (one attention call beats a call
    per prompt), long or often repeated ones shared; never without repeats (2 rows a prompt at least)."""
    from directpo.eval import sampling as S

    monkeypatch.setattr(S, "SHARED_KEYS_MIN", 65536)
    model = load_model(str(tiny_model))
    width = S._kv_width(model)
    assert width == model.config.num_key_value_heads * model.config.head_dim
    need = lambda rows, distinct: -(-65536 * distinct // ((rows - distinct) * width))  # noqa: E731  (prompt tokens)
    for rows, distinct in ((256, 64), (16, 1), (8, 4)):
        assert not S.shares_keys(model, rows, distinct, need(rows, distinct) - 1)
        assert S.shares_keys(model, rows, distinct, need(rows, distinct))
    assert not S.shares_keys(model, 8, 5, 10 ** 6)  # fewer than 2 rows a prompt
    assert not S.shares_keys(model, 8, 8, 10 ** 6)  # no repeats
