"""Vision-language examples -> token ids and image tensors (`directpo.data.vision_tokenize`, issue #30)."""
import pytest
import torch
from PIL import Image

from directpo.data.collate import collate_packed, collate_padded
from directpo.data.formats import DataError, Example, SkipReport, load_examples
from directpo.data.images import image_ref
from directpo.data.vision_tokenize import PER_TOKEN, mrope_positions, tokenize_vision_examples
from directpo.toy import COLOURS, MROPE_FAMILIES, VLM_FAMILIES, build_tiny_vlm, colour_image_task
from directpo.vision import load_processor, load_vision_model

LLAVAS = ("llava", "llava_next")  # all images of a batch on dim 0
TEXTS = [f"What colour is this picture? It is {c}. Compare the two pictures: both are {c}." for c in COLOURS] * 8


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vtask")
    train, _ = colour_image_task(tmp, n_train=3, n_eval=1)
    sizes = [(56, 56), (84, 42), (40, 70)]
    for j, size in enumerate(sizes):
        Image.new("RGB", size, list(COLOURS.values())[j]).save(tmp / f"x{j}.png")
    refs = [image_ref(str(tmp / f"x{j}.png"), None, "two.jsonl", 7, f"images[{j}]") for j in range(3)]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                           {"type": "image"}, {"type": "text", "text": " the two pictures:"}]}]
    two = [Example(prompt, [[{"role": "assistant", "content": "It is red. It is green. Both are red."}],
                            [{"role": "assistant", "content": "Both are blue."}]], "two.jsonl", 7, images=refs[:2]),
           Example(prompt, [[{"role": "assistant", "content": "It is green."}],
                            [{"role": "assistant", "content": "It is blue. Both are blue."}]], "two.jsonl", 8,
                   images=refs[1:])]
    return load_examples(str(train)) + two


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param, TEXTS)


def test_ids_equal_the_processor_on_the_whole_text(family_dir, task):
    family, path = family_dir
    processor = load_processor(str(path))
    tokenized, stats = tokenize_vision_examples(task, processor)
    assert len(tokenized) == len(task) and stats.responses_truncated == 0
    for ex, tok in zip(task, tokenized):
        images = [ref.open() for ref in ex.images]
        for k, response in enumerate(ex.responses):
            full = processor.apply_chat_template(ex.prompt + response, tokenize=False)
            ids = processor(text=[full], images=[images], add_special_tokens=False)["input_ids"][0]
            assert list(ids) == tok.prompt_ids + tok.response_ids[k]
            assert tok.response_ids[k]  # a response is never empty here
        # one example's image tensors, as its processor returns them, no per-token ones
        assert tok.vision and "pixel_values" in tok.vision and not set(tok.vision) & set(PER_TOKEN)
        assert tok.source == ex.source and tok.row == ex.row
        n_images = tok.vision["pixel_values"].shape[0 if family in LLAVAS else 1] if family not in MROPE_FAMILIES \
            else tok.vision["image_grid_thw"].shape[0]
        assert n_images == len(ex.images)
        assert (tok.prompt_positions is not None) == (family in MROPE_FAMILIES)


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_mrope_positions_equal_the_models(tmp_path, task, family):
    path = build_tiny_vlm(tmp_path, family, TEXTS)
    processor, model = load_processor(str(path)), load_vision_model(str(path))
    tokenized, _ = tokenize_vision_examples(task, processor)
    for tok in tokenized:
        want, _ = model.model.get_rope_index(torch.tensor([tok.prompt_ids]), tok.prompt_token_types[None],
                                             image_grid_thw=tok.vision["image_grid_thw"])
        assert torch.equal(tok.prompt_positions, want[:, 0])
    # a two-image prompt of non-square images: height and width streams really differ
    two = tokenized[-1].prompt_positions
    assert not torch.equal(two[1], two[2])
    # the packed layout: each prompt's positions, each response after them, as the model places the
    # response in its whole [prompt + response] row (so both responses start at the same position)
    batch = collate_packed(tokenized, processor.tokenizer.pad_token_id, 4096)
    assert batch.position_ids.shape == (3, 1, batch.input_ids.shape[1])
    for r, start, P, lens in batch.segments:  # segments are in packing order: each found by its ids
        s = start + P
        ids = batch.input_ids[r, start:s + lens[0]].tolist()
        tok = next(t for t in tokenized if t.prompt_ids + t.response_ids[0] == ids)
        assert torch.equal(batch.position_ids[:, r, start:s], tok.prompt_positions)
        for k, L in enumerate(lens):
            full = torch.tensor([tok.prompt_ids + tok.response_ids[k]])
            types = torch.cat([tok.prompt_token_types, torch.zeros(L, dtype=torch.long)])[None]
            want, _ = model.model.get_rope_index(full, types, image_grid_thw=tok.vision["image_grid_thw"])
            assert torch.equal(batch.position_ids[:, r, s:s + L], want[:, 0, P:])
            s += L


def test_mrope_positions_of_text_alone_count_on():
    types = torch.zeros(5, dtype=torch.long)
    assert torch.equal(mrope_positions(types, torch.zeros(0, 3, dtype=torch.long), 2),
                       torch.arange(5).expand(3, 5))


def test_collate_merges_images_as_each_family_wants(family_dir, task):
    family, path = family_dir
    processor = load_processor(str(path))
    tokenized, _ = tokenize_vision_examples(task, processor)
    pad = processor.tokenizer.pad_token_id
    padded, packed = collate_padded(tokenized, pad), collate_packed(tokenized, pad, 4096)
    images = sum(len(ex.images) for ex in task)
    pv_padded, pv_packed = padded.model_inputs["pixel_values"], packed.model_inputs["pixel_values"]
    if family == "idefics3":  # (rows, most images in a row, C, H, W), padded with all-zero images
        assert pv_padded.shape[:2] == (2 * len(task), 2) and pv_packed.shape[:2] == (1, images)
        real = (pv_padded != 0).flatten(2).any(-1)
        assert int(real.sum()) == 2 * images
        assert padded.model_inputs["pixel_attention_mask"].shape[:2] == pv_padded.shape[:2]
    elif family in LLAVAS:
        assert pv_padded.shape[0] == 2 * images and pv_packed.shape[0] == images
    else:
        grids = packed.model_inputs["image_grid_thw"]
        assert grids.shape == (images, 3) and padded.model_inputs["image_grid_thw"].shape == (2 * images, 3)
        assert pv_packed.shape[0] == int(grids.prod(-1).sum()) and pv_padded.shape[0] == 2 * pv_packed.shape[0]
        assert padded.model_inputs["mm_token_type_ids"].shape == padded.input_ids.shape
    # the padded rows: all chosen, then all rejected, each with its example's images in that order
    if family == "llava":
        order = [i for _ in range(2) for i, ex in enumerate(tokenized) for _ in ex.vision["pixel_values"]]
        want = torch.cat([tokenized[i].vision["pixel_values"] for i in dict.fromkeys(order)] * 2)
        assert torch.equal(pv_padded, want)
    if family == "llava_next":  # each image's own crops, then zeros up to the batch's most crops
        assert len({ex.vision["pixel_values"].shape[1] for ex in tokenized}) > 1  # (so there is padding)
        for batch in (padded, packed):
            o, pv = 0, batch.model_inputs["pixel_values"]
            for ex in batch.model_inputs.examples():  # (in row order, as their image tokens come)
                own = ex.vision["pixel_values"]
                n, c = own.shape[:2]
                assert torch.equal(pv[o:o + n, :c], own) and not pv[o:o + n, c:].any()
                assert torch.equal(batch.model_inputs["image_sizes"][o:o + n], ex.vision["image_sizes"])
                o += n
    moved = padded.to("cpu")
    assert moved.model_inputs.keys() == padded.model_inputs.keys()


def test_text_examples_collate_as_before(tiny_tokenizer):
    from directpo.data.tokenize import tokenize_examples

    tok = tokenize_examples([Example("Hi", ["a b", "c"], "t.jsonl", 0)], tiny_tokenizer)
    assert tok[0].vision is None and tok[0].prompt_positions is None
    for batch in (collate_padded(tok, 0), collate_packed(tok, 0)):
        assert batch.model_inputs is None
    assert collate_packed(tok, 0).position_ids.dim() == 2


def test_responses_cut_from_the_right_prompt_never(family_dir, task):
    _, path = family_dir
    processor = load_processor(str(path))
    (full,), _ = tokenize_vision_examples(task[-1:], processor)
    P = len(full.prompt_ids)
    (cut,), stats = tokenize_vision_examples(task[-1:], processor, max_length=P + 3)
    assert cut.prompt_ids == full.prompt_ids
    assert cut.response_ids == [r[:3] for r in full.response_ids]
    assert stats.responses_truncated == cut.responses_truncated == 2


def test_prompt_too_long_is_a_one_line_error_or_skipped(family_dir, task):
    _, path = family_dir
    processor = load_processor(str(path))
    (full,), _ = tokenize_vision_examples(task[:1], processor)
    P = len(full.prompt_ids)
    for kw in (dict(max_length=P), dict(max_length=4 * P, max_prompt_length=P - 1)):
        with pytest.raises(DataError, match=r"train\.jsonl, line 1, field 'prompt': prompt is \d+ tokens") as e:
            tokenize_vision_examples(task[:2], processor, **kw)
        assert "\n" not in str(e.value) and e.value.kind == "prompt_too_long"
    # skipped: the rows whose prompt leaves no room go (the two-image ones), the others stay
    lengths = [len(t.prompt_ids) for t in tokenize_vision_examples(task, processor)[0]]
    limit = min(lengths[-2:])
    assert limit > P + 1
    report = SkipReport()
    kept, _ = tokenize_vision_examples(task, processor, max_length=limit, on_invalid="skip", skipped=report)
    assert [t.row for t in kept] == [ex.row for ex, n in zip(task, lengths) if n < limit]
    assert report.counts["prompt_too_long"] == len(task) - len(kept) > 0
    with pytest.raises(DataError, match="no usable rows"):
        tokenize_vision_examples(task, processor, max_length=2, on_invalid="skip")


def test_image_placeholder_count_mismatch_is_a_one_line_error(family_dir, task):
    _, path = family_dir
    processor = load_processor(str(path))
    two = task[-1]
    for images in (two.images[:1], two.images + two.images[:1]):  # fewer, more
        bad = Example(two.prompt, two.responses, "bad.jsonl", 4, images=images)
        with pytest.raises(DataError, match=r"bad\.jsonl, line 5, field 'images': \d images?, but the prompt has "
                                            "2 image placeholders") as e:
            tokenize_vision_examples([bad], processor)
        assert "\n" not in str(e.value) and e.value.kind == "image_count"
    report = SkipReport()
    bad = Example(two.prompt, two.responses, "bad.jsonl", 4, images=two.images[:1])
    kept, _ = tokenize_vision_examples([bad, task[0]], processor, on_invalid="skip", skipped=report)
    assert len(kept) == 1 and report.counts["image_count"] == 1


def test_padded_batch_equals_the_processors_own_batch(family_dir, task):
    """The padded layout is what the processor makes of the batch of [prompt + response] texts (rows:
    all chosen, then all rejected), right-padded: the same ids, mask and image tensors."""
    _, path = family_dir
    processor = load_processor(str(path))
    tokenized, _ = tokenize_vision_examples(task, processor)
    batch = collate_padded(tokenized, processor.tokenizer.pad_token_id)
    texts = [processor.apply_chat_template(ex.prompt + ex.responses[k], tokenize=False)
             for k in range(2) for ex in task]
    images = [[ref.open() for ref in ex.images] for _ in range(2) for ex in task]
    processor.tokenizer.padding_side = "right"
    enc = processor(text=texts, images=images, add_special_tokens=False, padding=True, return_tensors="pt")
    assert torch.equal(enc.pop("input_ids"), batch.input_ids)
    assert torch.equal(enc.pop("attention_mask"), batch.attention_mask)
    assert enc.keys() == batch.model_inputs.keys()
    for k, v in enc.items():
        assert v.dtype == batch.model_inputs[k].dtype and torch.equal(v, batch.model_inputs[k]), k


def test_plain_text_prompt_with_the_image_token(family_dir, task):
    """A text prompt (in-memory rows) holds the processor's image token once per image; its responses
    get EOS as text responses do."""
    _, path = family_dir
    processor = load_processor(str(path))
    prompt = f"{processor.image_token}What colour is this picture?"
    ex = Example(prompt, [" It is red.", " It is blue, surely."], "mem", 0, images=task[0].images)
    (tok,), _ = tokenize_vision_examples([ex], processor)
    images = [ref.open() for ref in ex.images]
    eos = processor.tokenizer.eos_token_id
    for k, response in enumerate(ex.responses):
        ids = processor(text=[prompt + response], images=[images])["input_ids"][0]
        assert tok.prompt_ids + tok.response_ids[k] == list(ids) + [eos]
    with pytest.raises(DataError, match="1 image, but the prompt has 2 image placeholders"):
        tokenize_vision_examples([Example(prompt * 2, ex.responses, "mem", 0, images=ex.images)], processor)


def test_examples_hold_image_references_not_pixels(family_dir, task, tmp_path):
    """The pixels are made when a batch needs them (a data set of 50k image rows would otherwise hold
    tens of GB of patches), equal to what the processor gave at tokenization; the row's identity for
    the reference cache is a digest of its decoded images; an image changed on disk since is the
    row's one-line error."""
    import shutil

    from directpo.data.formats import parse_row

    family, path = family_dir
    processor = load_processor(str(path))
    examples, _ = tokenize_vision_examples(task, processor)
    for ex, raw in zip(examples, task):
        kept = [t for t in ex.vision._small.values()]  # (the grids and sizes: a few numbers each)
        assert sum(t.numel() for t in kept) <= 64 * len(kept)
        images = [ref.open() for ref in raw.images]
        from directpo.data.vision_tokenize import _encode

        enc = _encode(processor, ex.vision._text, raw, ex.vision._special)
        made = ex.vision.tensors()
        assert set(made) == set(k for k in enc if k not in PER_TOKEN and isinstance(enc[k], torch.Tensor))
        assert all(torch.equal(made[k], enc[k]) for k in made) and images
    # the same picture as another file: the same digest; another picture: another
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (56, 56), (200, 10, 10)).save(a)
    shutil.copy(a, b)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]

    def row(img):
        return parse_row({"images": [str(img)], "prompt": prompt, "chosen": [{"role": "assistant", "content": "red"}],
                          "rejected": [{"role": "assistant", "content": "blue"}]}, "d.jsonl", 0)

    (ea, eb), _ = tokenize_vision_examples([row(a), row(b)], processor)
    assert ea.vision.digest == eb.vision.digest
    Image.new("RGB", (56, 56), (10, 10, 200)).save(b)  # edited after the data was read
    (ec,), _ = tokenize_vision_examples([row(b)], processor)
    assert ec.vision.digest != ea.vision.digest
    Image.new("RGB", (90, 40), (10, 200, 10)).save(a)  # another size: other tensors than tokenized
    with pytest.raises(DataError, match="an image changed since the data was read"):
        ea.vision.tensors()
