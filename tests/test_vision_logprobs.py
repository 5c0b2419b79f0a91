"""Per-pair log-probs of image preference pairs (issue #30): the padded layout against transformers'
own computation, the prefix-shared packed layout against the padded one (log-probs and gradients),
and the vision tower run once per example when packed."""
import pytest
import torch
from PIL import Image

from directpo.data.collate import collate_packed, collate_padded
from directpo.attention import NAME, segment_attention, supports_segment_attention
from directpo.data.formats import Example, load_examples
from directpo.data.images import image_ref
from directpo.data.vision_tokenize import tokenize_vision_examples
from directpo.logprobs import example_logps, per_example, sum_per_sequence, token_logps
from directpo.toy import COLOURS, MROPE_FAMILIES, VLM_FAMILIES, build_tiny_vlm, colour_image_task
from directpo.vision import load_processor, load_vision_model
from conftest import spread_weights

TEXTS = [f"What colour is this picture? It is {c}. Compare the two pictures: both are {c}." for c in COLOURS] * 8
TOWERS = ("visual", "vision_tower", "vision_model")  # Qwen2-VL and Qwen2.5-VL, LLaVA, Idefics3


def _two_image_rows(tmp, n=2):
    """Hand-made rows with two images of different sizes each, and answers of different lengths."""
    rows = []
    for i in range(n):
        paths = []
        for j, (colour, size) in enumerate([("red", (56, 56)), ("blue", (84, 42) if i else (40, 70))]):
            path = tmp / f"two{i}_{j}.png"
            Image.new("RGB", size, COLOURS[colour]).save(path)
            paths.append(str(path))
        refs = [image_ref(p, None, "two.jsonl", i, f"images[{j}]") for j, p in enumerate(paths)]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                               {"type": "image"}, {"type": "text", "text": " the two pictures:"}]}]
        chosen = "It is red. It is blue." + " Both are red." * i
        rows.append(Example(prompt, [[{"role": "assistant", "content": chosen}],
                                     [{"role": "assistant", "content": "Both are blue."}]], "two.jsonl", i,
                            images=refs))
    return rows


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def setup(request, tmp_path_factory):
    """(family, model with weights spread out (so that log-probs depend visibly on every input),
    processor, tokenized examples: 2 colour-task rows and 2 two-image rows, all of differing lengths)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"vlm_{family}")
    model_dir = build_tiny_vlm(tmp / "model", family, TEXTS, seed=0)
    model, processor = load_vision_model(str(model_dir)), load_processor(str(model_dir))
    spread_weights(model)
    train, _ = colour_image_task(tmp / "task", n_train=4, n_eval=1)
    examples = load_examples(str(train))[:2] + _two_image_rows(tmp)
    tokenized, _ = tokenize_vision_examples(examples, processor)
    return family, model, processor, examples, tokenized


def _plain_token_logps(model, processor, example: Example) -> list[torch.Tensor]:
    """Per response, its tokens' log-probs as transformers computes them: the processor on the whole
    [prompt + response] rendered text and images, the model's logits, a gather."""
    prompt = processor.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
    images = [ref.open() for ref in example.images]
    n_prompt = processor(text=[prompt], images=[images], add_special_tokens=False,
                         return_tensors="pt")["input_ids"].shape[1]
    out = []
    for response in example.responses:
        full = processor.apply_chat_template(example.prompt + response, tokenize=False)
        assert full.startswith(prompt)
        enc = processor(text=[full], images=[images], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].float()
        ids = enc["input_ids"][0]
        out.append(torch.log_softmax(logits[n_prompt - 1:-1], dim=-1).gather(1, ids[n_prompt:, None]).squeeze(1))
    return out


def per_sequence(tokens: torch.Tensor, batch) -> list[torch.Tensor]:
    """Token log-probs grouped by response sequence (in token order): comparable across layouts."""
    return [tokens[batch.label_seq == s] for s in range(batch.num_seqs)]


# fp32 sums of ~100 nats: a few units in the last place (7.6e-6 each) apart, whatever the layout
SUM_TOL = dict(atol=1e-5, rtol=1e-6)


def test_padded_equals_transformers(setup):
    _, model, processor, examples, tokenized = setup
    batch = collate_padded(tokenized, processor.tokenizer.pad_token_id)
    expected = [_plain_token_logps(model, processor, ex) for ex in examples]
    sums = torch.stack([torch.stack([t.sum() for t in per]) for per in expected])
    assert (sums[:, 0] - sums[:, 1]).abs().min() > 1e-2  # the pairs differ: a real comparison
    for fused in (True, False):
        with torch.no_grad():
            tokens = per_sequence(token_logps(model, batch, fused=fused), batch)
            got = example_logps(model, batch, fused=fused)
        for i, per in enumerate(expected):
            for k, want in enumerate(per):
                torch.testing.assert_close(tokens[int(batch.seq_index[i, k])], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, sums, **SUM_TOL)


def _grads(model, batch, weights, **kw):
    """(per-sequence token log-probs, (B, K) summed log-probs, gradients of Σ weights · log-probs)."""
    model.zero_grad(set_to_none=True)
    tokens = token_logps(model, batch, **kw)
    lp = per_example(batch, sum_per_sequence(tokens, batch))
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_sequence(tokens.detach(), batch), lp.detach(), grads


@pytest.mark.parametrize("row_tokens", [None, 4096])
def test_packed_equals_padded_logps_and_gradients(setup, row_tokens):
    _, model, processor, _, tokenized = setup
    pad = processor.tokenizer.pad_token_id
    padded = collate_padded(tokenized, pad)
    packed = collate_packed(tokenized, pad, row_tokens)
    if row_tokens:
        assert packed.input_ids.shape[0] == 1  # several examples share one row
    weights = torch.randn(len(tokenized), 2, generator=torch.Generator().manual_seed(1))
    tok_ref, lp_ref, g_ref = _grads(model, padded, weights)
    vision = [n for n in g_ref if any(t in n for t in TOWERS)]
    assert vision and any(g_ref[n].abs().max() > 0 for n in vision)  # the vision tower is trained too
    for segmented in (True, False):  # segment by segment, and the dense 4D mask
        tok, lp, g = _grads(model, packed, weights, segmented=segmented)
        for a, b in zip(tok, tok_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, lp_ref, **SUM_TOL)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def _tower(model):
    inner = model.model
    return next(getattr(inner, t) for t in TOWERS if hasattr(inner, t))


def test_vision_tower_runs_once_per_example_when_packed(setup):
    family, model, processor, examples, tokenized = setup
    pad = processor.tokenizer.pad_token_id
    calls = []

    def count(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        calls.append(pixels.shape[0])  # images (LLaVA, Idefics3) or patches (Qwen2-VL, Qwen2.5-VL) fed

    # what one copy of each example's images is: its patches (Qwen2-VL's tower takes patch rows), its
    # crops (LLaVA-NeXT: each image's own count, as the processor makes them of that image alone), or its images
    def crops(image):
        return processor.image_processor(images=[image.open()], return_tensors="pt")["pixel_values"].shape[1]

    per_example = [ex.vision["pixel_values"].shape[0] if family in MROPE_FAMILIES
                   else sum(map(crops, src.images)) if family == "llava_next" else len(src.images)
                   for ex, src in zip(tokenized, examples)]
    handle = _tower(model).register_forward_pre_hook(count, with_kwargs=True)
    try:
        with torch.no_grad():
            example_logps(model, collate_packed(tokenized, pad, 4096))
            packed_calls, calls[:] = list(calls), []
            example_logps(model, collate_padded(tokenized, pad))
            padded_calls = list(calls)
    finally:
        handle.remove()
    assert packed_calls == [sum(per_example)]  # one run, one copy of each example's images
    assert padded_calls == [2 * sum(per_example)]  # the padded layout pays every image twice


def test_segment_attention_points_the_language_model_only(setup):
    """The packed layout attends segment by segment in the language model; the vision tower keeps its
    own attention (its patches are no segment of the text)."""
    _, model, processor, _, tokenized = setup
    assert supports_segment_attention(model)  # so the segmented runs above really took that path
    text, vision = model.config.get_text_config(), model.config.vision_config
    before = (text._attn_implementation, vision._attn_implementation)
    batch = collate_packed(tokenized, processor.tokenizer.pad_token_id, 4096)
    with segment_attention(model, batch.segments):
        assert text._attn_implementation == NAME
        assert vision._attn_implementation == before[1] != NAME
    assert (text._attn_implementation, vision._attn_implementation) == before


def test_the_tested_families_are_the_toy_ones():
    from directpo.vision import TESTED_FAMILIES

    assert set(TESTED_FAMILIES) == set(VLM_FAMILIES)  # the families said to be exact are the ones tested here


def test_smolvlm_is_refused_in_one_line_where_a_vlm_is_loaded(tmp_path):
    """SmolVLM (its own model type; Idefics3's architecture, but a processor that needs torchvision and
    num2words) is not supported yet: refused where its model or processor is loaded."""
    import json

    from transformers import LlamaConfig, SmolVLMConfig

    from directpo.errors import UserValueError
    from directpo.vision import TESTED_FAMILIES, empty_vision_model, is_vision_model

    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    config = SmolVLMConfig(text_config=text, vision_config={"hidden_size": 16, "intermediate_size": 32,
                                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                                            "image_size": 28, "patch_size": 14})
    config.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor"}))
    assert is_vision_model(str(tmp_path))  # a vision-language model, so the commands take it as one
    want = f"smolvlm is not supported yet (issue #30): supported: {', '.join(TESTED_FAMILIES)}"
    for load in (load_vision_model, empty_vision_model, load_processor):
        with pytest.raises(UserValueError) as e:
            load(str(tmp_path))
        assert str(e.value) == want, load.__name__
