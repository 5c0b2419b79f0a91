"""The lean decode step (`directpo.eval.decode`): the same logits as the model's own forward, so the
sampler's samples are unchanged by it, and used only where that holds."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from directpo.eval import sampling
from directpo.eval.decode import lean_decoder
from directpo.eval.sampling import generate_completions
from directpo.models import load_model, load_tokenizer

from conftest import spread_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(kind: str):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":  # (biases on q, k, v)
        return spread_weights(Qwen2ForCausalLM(Qwen2Config(**common))).eval()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return spread_weights(LlamaForCausalLM(LlamaConfig(**common, rope_scaling=scaling))).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_lean_step_gives_the_forwards_logits(kind):
    """One decode step after a left-padded prefill: the lean step's logits = the model's forward's,
    each row at its own position (GQA, RoPE scaling, q/k/v biases)."""
    from directpo.eval.sampling import _new_cache

    model = _small(kind)
    step = lean_decoder(model)
    assert step is not None
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    ids, mask = sampling._left_padded(prompts, 0, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [_new_cache(8), _new_cache(8)]
    with torch.no_grad():
        for c in caches:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
        tok, nxt = torch.tensor([3, 4, 5]), pos[:, -1] + 1
        full = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
        want = model(input_ids=tok[:, None], attention_mask=full, position_ids=nxt[:, None], cache=caches[0],
                     use_cache=True).logits[:, -1]
        got = step(tok, nxt, caches[1], full)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_samples_are_unchanged_by_the_lean_step(tiny_model, monkeypatch, k):
    """Seeded samples, with prompts of different lengths (padding) and with K samples a prompt (the
    shared-prompt attention), equal those of the model's own forward."""
    model, tok = load_model(str(tiny_model)).eval(), load_tokenizer(str(tiny_model))
    assert lean_decoder(model) is not None
    prompts = [tok(t)["input_ids"] for t in ("Review of Kalo:", "A long review of Mirento, the film:", "Sa")]
    rows = [p for p in prompts for _ in range(k)]
    lean = generate_completions(model, tok, rows, 12, 1.0, 1.0, seed=5, batch_size=len(rows))
    monkeypatch.setattr(sampling, "lean_decoder", lambda m: None)
    plain = generate_completions(model, tok, rows, 12, 1.0, 1.0, seed=5, batch_size=len(rows))
    assert lean == plain and len({tuple(r) for r in lean}) > len(prompts) // 2


def test_used_only_where_it_is_the_same_computation(tiny_model):
    from peft import LoraConfig, get_peft_model

    assert lean_decoder(_small("llama")) is not None
    assert lean_decoder(_small("llama").to(torch.bfloat16)) is None  # (transformers' norms upcast)
    eager = _small("llama")
    eager.config._attn_implementation = "eager"
    assert lean_decoder(eager) is None
    adapted = get_peft_model(_small("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lean_decoder(adapted) is None  # an adapter's linear layer is not a plain one
    assert lean_decoder(torch.nn.Linear(2, 2)) is None
