"""`directpo sample` with image prompts on a vision-language model (issue #30): greedy samples equal
transformers' `generate`, seeded samples do not depend on prefill sharing or batching, sampled tokens'
log-probs equal a full forward's, the same text with other pictures is never merged, and a
text-only model refuses image rows in one line."""
import json

import pytest
import torch
from PIL import Image

from directpo.cli import main
from directpo.data.images import image_ref
from directpo.data.prompts import PromptItem
from directpo.data.tokenize import render_prompt
from directpo.eval import sampling
from directpo.eval.sample import encode_image_samples
from directpo.eval.sampling import cut_at_eos, generate_completions, sample_batch
from directpo.toy import COLOURS, VLM_FAMILIES, build_tiny_vlm, colour_image_task
from directpo.vision import load_processor, load_vision_model
from conftest import spread_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"What colour is this picture? It is {c}. Compare the two pictures: both are {c}." for c in COLOURS] * 8
# (colour, image size, question): prompts of different lengths, and for Qwen2-VL different image grids
PROMPTS = [("red", (56, 56), "What colour?"), ("blue", (84, 42), "What colour is this picture, please?"),
           ("green", (28, 56), "Colour"), ("yellow", (42, 84), "Name the colour of this picture.")]


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def vlm(request, tmp_path_factory):
    """(family, model with weights spread out (so that samples depend visibly on the image), processor,
    prompt items with one image each)."""
    tmp = tmp_path_factory.mktemp(f"sample_{request.param}")
    model_dir = build_tiny_vlm(tmp / "model", request.param, TEXTS, seed=0)
    model, processor = load_vision_model(str(model_dir)), load_processor(str(model_dir))
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    spread_weights(model)
    items = [_item(tmp, i, colour, size, question) for i, (colour, size, question) in enumerate(PROMPTS)]
    return request.param, model, processor, items, model_dir, tmp


def _item(tmp, i, colour, size, question, name=None):
    path = tmp / (name or f"{i}.png")
    Image.new("RGB", size, COLOURS[colour]).save(path)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return PromptItem(prompt, None, "p.jsonl", i, [image_ref(str(path), None, "p.jsonl", i, "images[0]")])


def _processed(processor, item):
    text, _ = render_prompt(item.prompt, processor)
    return processor(text=[text], images=[[ref.open() for ref in item.images]], return_tensors="pt",
                     add_special_tokens=False)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_samples_equal_transformers_generate(vlm, k):
    """Temperature 0: each prompt's samples are what `model.generate` gives on the processor's output
    for that prompt alone (no padding, the model's own positions), though ours are batched, left-padded
    and (K = 3) share one prefill per prompt."""
    _, model, processor, items, _, _ = vlm
    tok, T = processor.tokenizer, 8
    vision = encode_image_samples(processor, items, k)
    assert len({len(v.prompt_ids) for v in vision}) > 1  # padding happens
    ours = generate_completions(model, tok, [v.prompt_ids for v in vision], T, 0.0, batch_size=len(vision),
                                vision=vision)
    for i, item in enumerate(items):
        enc = _processed(processor, item)
        out = model.generate(**enc, do_sample=False, max_new_tokens=T, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        expected = cut_at_eos(out[0, enc["input_ids"].shape[1]:].tolist(), tok.eos_token_id)
        assert ours[i * k:(i + 1) * k] == [expected] * k, i


def test_seeded_samples_do_not_depend_on_sharing_or_batching(vlm):
    """Temperature 1, fixed uniforms: the same samples whether repeats share their prefill or not, and
    whether the rows are sampled in one batch or in batches of 1 and 3."""
    _, model, processor, items, _, _ = vlm
    tok, T = processor.tokenizer, 6
    vision = encode_image_samples(processor, items, 2)
    ids = [v.prompt_ids for v in vision]
    u = torch.rand(len(ids), T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = (T, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id)
    shared = sample_batch(model, ids, *args, uniforms=u, vision=vision)
    unshared = sample_batch(model, ids, *args, uniforms=u, vision=vision, share_prefix=False)
    ones = [sample_batch(model, [p], *args, uniforms=u[i:i + 1], vision=[vision[i]])[0] for i, p in enumerate(ids)]
    threes = [c for s in range(0, len(ids), 3)
              for c in sample_batch(model, ids[s:s + 3], *args, uniforms=u[s:s + 3], vision=vision[s:s + 3])]
    assert shared == unshared == ones == threes
    assert len({tuple(c) for c in shared}) > len(items)  # samples, not one answer per prompt
    again = generate_completions(model, tok, ids, T, 1.0, seed=5, batch_size=3, vision=vision)
    assert again == generate_completions(model, tok, ids, T, 1.0, seed=5, batch_size=3, vision=vision)


def test_sampled_token_logprobs_equal_a_full_forward(vlm, monkeypatch):
    """Each sampled token's log-prob under the sampler's logits equals the one a separate forward of
    [prompt | completion] gives (the processor's ids and images, the model's own positions) within
    1e-5: the prefill's images, padding and M-RoPE positions and the decode's positions are right."""
    family, model, processor, items, _, _ = vlm
    tok, T = processor.tokenizer, 6
    vision = encode_image_samples(processor, items, 2)
    seen = []
    real = sampling.next_token
    image_token = tok.convert_tokens_to_ids(processor.image_token)

    def recording(logits, *a, **kw):
        seen.append(torch.log_softmax(logits.double(), -1))
        # (an image token sampled would be a placeholder without its image in the full forward)
        return real(logits.index_fill(-1, torch.tensor([image_token]), float("-inf")), *a, **kw)

    monkeypatch.setattr(sampling, "next_token", recording)
    u = torch.rand(len(vision), T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    comps = sample_batch(model, [v.prompt_ids for v in vision], T, 1.0, 1.0, None, tok.pad_token_id, uniforms=u,
                         vision=vision)  # no EOS: every row decoded to the end, the rows in input order
    assert len(seen) == T
    for r, comp in enumerate(comps):
        enc = _processed(processor, items[r // 2])
        P = enc["input_ids"].shape[1]
        assert enc["input_ids"][0].tolist() == vision[r].prompt_ids
        full = dict(enc, input_ids=torch.cat([enc["input_ids"], torch.tensor([comp])], 1),
                    attention_mask=torch.ones(1, P + T, dtype=torch.long))
        if "mm_token_type_ids" in enc:  # Qwen2-VL: the model places its M-RoPE positions from them
            full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"],
                                                   enc["mm_token_type_ids"].new_zeros(1, T)], 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(**full).logits[0, P - 1:P + T - 1].double(), -1)
        ours = torch.stack([seen[t][r, comp[t]] for t in range(T)])
        torch.testing.assert_close(ours, logp[torch.arange(T), torch.tensor(comp)], atol=1e-5, rtol=0)


def test_same_text_other_picture_is_not_merged(vlm):
    """Two rows with the same ids but different pictures are two prefill rows and sample as each does
    alone; the same picture twice (another file) is one prefill row."""
    _, model, processor, items, _, tmp = vlm
    tok, T = processor.tokenizer, 8
    question = PROMPTS[0][2]
    red, blue = _item(tmp, 0, "red", (56, 56), question, "r.png"), _item(tmp, 1, "blue", (56, 56), question, "b.png")
    red2 = _item(tmp, 2, "red", (56, 56), question, "r2.png")
    vision = encode_image_samples(processor, [red, blue, red2], 1)
    assert vision[0].prompt_ids == vision[1].prompt_ids == vision[2].prompt_ids
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        both = generate_completions(model, tok, [v.prompt_ids for v in vision], T, 0.0, vision=vision)
    finally:
        hook.remove()
    assert rows[0] == (2, len(vision[0].prompt_ids))  # red (twice: one row) and blue
    alone = [generate_completions(model, tok, [v.prompt_ids], T, 0.0, vision=[v])[0] for v in vision]
    assert both == alone
    assert both[0] == both[2] and both[0] != both[1]  # the picture decides (the weights are spread out)


def test_sample_command_with_images(vlm, tmp_path):
    """`directpo sample` end to end on the colour task's rows with a VLM: one line per sample."""
    _, _, _, _, model_dir, _ = vlm
    _, held_out = colour_image_task(tmp_path / "task", n_train=1, n_eval=3)
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(model_dir), "--prompts", str(held_out), "--out", str(out), "--n", "2",
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    lines = [json.loads(line) for line in open(out)]
    assert [(x["prompt_index"], x["index"]) for x in lines] == [(i, j) for i in range(3) for j in range(2)]
    assert all(0 <= x["completion_tokens"] <= 4 for x in lines)


def test_text_only_model_refuses_image_rows_in_one_line(tiny_model, tmp_path, capsys):
    _, held_out = colour_image_task(tmp_path / "task", n_train=1, n_eval=2)
    assert main(["sample", "--model", str(tiny_model), "--prompts", str(held_out), "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("directpo sample: error: images in ") and str(held_out) in err
    assert "vision-language" in err and "issue #30" in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()


def test_best_of_n_with_images(vlm, tmp_path):
    """`bon` samples image prompts with a VLM as `sample` does; its reward (a text function) picks the best."""
    from directpo.eval.bon import best_of_n

    _, _, _, _, model_dir, _ = vlm
    _, held_out = colour_image_task(tmp_path / "task", n_train=1, n_eval=2)
    out = tmp_path / "b.jsonl"
    result = best_of_n(str(model_dir), str(held_out), str(out), 3, lambda prompt, completion: float(len(completion)),
                       max_new_tokens=5, progress=False)
    rows = [json.loads(line) for line in open(out)]
    assert result["prompts"] == len(rows) == 2
    for row in rows:
        assert len(row["completions"]) == 3 and row["completion"] == max(row["completions"], key=len)
        assert row["prompt"][0]["content"][0] == {"type": "image"}
