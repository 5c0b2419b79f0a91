"""`directpo eval` with image prompts on a vision-language model (issue #30): the log-probs behind
KL(π‖πref) come from forwards given the prompts' images (equal to transformers' own forward of
[prompt | completion] with the processor's image tensors), the KL of a model against itself is 0
and against another model is not, the picture changes the log-probs, a text-only model or --ref is
refused in one line, and the command writes its results with kl_mean."""
import json

import pytest
import torch
from PIL import Image

from directpo.cli import main
from directpo.data.images import image_ref
from directpo.data.prompts import PromptItem, load_prompts
from directpo.data.tokenize import IMAGE_COMMANDS, render_prompt
from directpo.eval import sampling
from directpo.eval.evaluate import evaluate_policy, image_completion_logps, sequence_kl
from directpo.eval.sample import Samples, draw_samples, encode_image_samples
from directpo.toy import COLOURS, build_tiny_vlm, colour_image_task
from directpo.vision import load_processor, load_vision_model
from conftest import spread_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"What colour is this picture? It is {c}. Compare the two pictures: both are {c}." for c in COLOURS] * 8
QUESTION = "What colour is this picture?"


def _spread_and_save(model_dir, seed: int):
    """The model at `model_dir` with its weights spread out (a random init of std 0.02 gives
    near-uniform logits, where differences would hide), saved back; the loaded model."""
    model = load_vision_model(str(model_dir))
    spread_weights(model, seed)
    model.save_pretrained(model_dir)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def vlms(request, tmp_path_factory):
    """(family, policy dir, policy, ref dir, ref, processor, held-out image prompt file): two tiny VLMs
    of one family with the same tokenizer and different weights."""
    tmp = tmp_path_factory.mktemp(f"eval_{request.param}")
    dirs = [build_tiny_vlm(tmp / name, request.param, TEXTS, seed=seed) for seed, name in enumerate(["pol", "ref"])]
    models = [_spread_and_save(d, seed) for seed, d in enumerate(dirs)]
    _, held_out = colour_image_task(tmp / "task", n_train=1, n_eval=3)
    return request.param, dirs[0], models[0], dirs[1], models[1], load_processor(str(dirs[0])), held_out


@pytest.fixture
def no_placeholders(vlms, monkeypatch):
    """The sampler never draws the image placeholder token (a placeholder without its image: such a
    sample is left out of the KL, tested on its own below), so every sample here is scored."""
    real, placeholder = sampling.next_token, torch.tensor([vlms[2].config.image_token_id])
    monkeypatch.setattr(sampling, "next_token",
                        lambda logits, *a, **kw: real(logits.index_fill(-1, placeholder, float("-inf")), *a, **kw))


def _full_forward_logp(model, processor, item: PromptItem, completion: list[int]) -> float:
    """log π(completion | prompt, images) as transformers computes it: the processor on the rendered
    prompt and its images, the completion's ids appended, one forward, a gather."""
    text, _ = render_prompt(item.prompt, processor)
    enc = processor(text=[text], images=[[ref.open() for ref in item.images]], return_tensors="pt",
                    add_special_tokens=False)
    P, T = enc["input_ids"].shape[1], len(completion)
    full = dict(enc, input_ids=torch.cat([enc["input_ids"], torch.tensor([completion])], 1),
                attention_mask=torch.ones(1, P + T, dtype=torch.long))
    if "mm_token_type_ids" in enc:  # Qwen2-VL places its M-RoPE positions from them
        full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], enc["mm_token_type_ids"].new_zeros(1, T)], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(**full).logits[0, P - 1:P + T - 1].double(), -1)
    return logp[torch.arange(T), torch.tensor(completion)].sum().item(), enc["input_ids"][0].tolist()


def _draw(vlms, n=2, max_new_tokens=6, seed=3):
    _, _, policy, _, _, processor, held_out = vlms
    items = load_prompts(str(held_out))
    return draw_samples(policy, processor.tokenizer, items, n, max_new_tokens, 1.0, 1.0, seed, 4,
                        processor=processor)


def test_kl_logps_equal_a_full_transformers_forward(vlms, no_placeholders):
    """(1) The log-probs sequence_kl uses, under π and under πref, equal a separate full forward of
    transformers' model on the processor's prompt (its images, the model's own positions) followed by
    the completion, within 1e-5 — though ours are packed, a prompt's 2 samples sharing its images."""
    s = _draw(vlms)
    _, _, policy, _, ref, processor, _ = vlms
    assert s.vision is not None and len(s.texts) == 6
    assert len({tuple(c) for c in s.completion_ids}) > 1
    kl = sequence_kl(policy, ref, s, processor.tokenizer.pad_token_id, batch_size=4)
    for k, comp in enumerate(s.completion_ids):
        for model, ours in ((policy, kl["logps"]), (ref, kl["ref_logps"])):
            expected, prompt_ids = _full_forward_logp(model, processor, s.prompt_of(k), comp)
            assert prompt_ids == s.prompt_ids[k]
            assert abs(ours[k].item() - expected) < 1e-5, (k, ours[k].item(), expected)
    assert kl["kl_excluded"] == 0 and kl["kl_samples"] == 6


def test_kl_against_itself_is_zero_and_against_another_model_is_not(vlms, no_placeholders, tmp_path):
    """(2) Through evaluate_policy (the images in every forward): a VLM against itself, 0; against
    another VLM of its family, > 0; both from the same samples of π."""
    _, pol_dir, _, ref_dir, _, _, held_out = vlms
    kw = dict(n=2, max_new_tokens=5, seed=1, progress=False, batch_size=4)
    same = evaluate_policy(str(pol_dir), str(held_out), str(tmp_path / "same.json"), ref=str(pol_dir), **kw)
    other = evaluate_policy(str(pol_dir), str(held_out), str(tmp_path / "other.json"), ref=str(ref_dir), **kw)
    assert same["kl_samples"] == other["kl_samples"] == 6 and same["image_prompts"] == 3
    assert abs(same["kl_mean"]) < 1e-6
    assert other["kl_mean"] > 0.1, other["kl_mean"]


def test_the_picture_changes_the_logps(vlms, tmp_path):
    """(3) The same prompt text and completion with a red and with a blue picture: the prompt ids are
    the same, the log-probs are not (the images reach the forward); the same red picture from
    another file gives the same log-prob."""
    _, _, policy, _, _, processor, _ = vlms
    items = []
    for i, (colour, name) in enumerate([("red", "r.png"), ("blue", "b.png"), ("red", "r2.png")]):
        Image.new("RGB", (56, 56), COLOURS[colour]).save(tmp_path / name)
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        items.append(PromptItem(prompt, None, "p.jsonl", i,
                                [image_ref(str(tmp_path / name), None, "p.jsonl", i, "images[0]")]))
    tok = processor.tokenizer
    completion = tok("It is red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    vision = encode_image_samples(processor, items, 1)
    assert vision[0].prompt_ids == vision[1].prompt_ids == vision[2].prompt_ids
    s = Samples(items, [v.prompt_ids for v in vision], [completion] * 3, ["It is red."] * 3, 1, vision=vision)
    red, blue, red2 = image_completion_logps(policy, s, tok.pad_token_id).tolist()
    assert abs(red - blue) > 1e-3, (red, blue)
    assert abs(red - red2) < 1e-5, (red, red2)
    assert abs(red - _full_forward_logp(policy, processor, items[0], completion)[0]) < 1e-5


def test_a_sample_holding_an_image_placeholder_is_left_out_of_the_kl(vlms):
    """A forward given images reads every placeholder token as an image's: a sample that drew one is
    left out of the KL (NaN log-prob, counted in kl_excluded), the others' mean unchanged."""
    _, _, policy, _, ref, processor, _ = vlms
    s = _draw(vlms, n=2, max_new_tokens=4)
    pad = processor.tokenizer.pad_token_id
    clean = [k for k, c in enumerate(s.completion_ids) if policy.config.image_token_id not in c]
    s.completion_ids[clean[0]] = [policy.config.image_token_id, processor.tokenizer.eos_token_id]
    kl = sequence_kl(policy, ref, s, pad, batch_size=4)
    assert kl["kl_excluded"] == 6 - len(clean) + 1 and kl["kl_samples"] == len(clean) - 1
    assert torch.isnan(kl["logps"][clean[0]]) and torch.isnan(kl["ref_logps"][clean[0]])
    rest = clean[1:]
    diffs = (kl["logps"][rest] - kl["ref_logps"][rest]).double()
    assert abs(kl["kl_mean"] - diffs.mean().item()) < 1e-9


def test_text_only_model_or_ref_with_image_prompts_is_one_line(vlms, tiny_model, tmp_path, capsys):
    """(4) Image rows with a text-only --model: refused in one line naming the commands that read
    images; a VLM --model with a text-only --ref: one line naming both; nothing written."""
    _, pol_dir, _, _, _, _, held_out = vlms
    out = tmp_path / "e.json"
    argv = ["eval", "--prompts", str(held_out), "--out", str(out), "--reward-fn",
            "directpo.eval.scorers:review_sentiment", "--max-new-tokens", "3", "--no-progress"]
    assert main(argv + ["--model", str(tiny_model), "--ref", str(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"directpo eval: error: images in {held_out} (3 rows") and IMAGE_COMMANDS in err, err
    assert main(argv + ["--model", str(pol_dir), "--ref", str(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("directpo eval: error: images in ") and f"--model {pol_dir}" in err, err
    assert f"--ref {tiny_model} is a text-only model" in err and "Traceback" not in err
    assert not out.exists()


def test_ref_of_another_family_is_one_line(tmp_path, capsys):
    """A VLM --ref of another family would be given image tensors made for --model's: refused in one
    line naming both, before a model loads."""
    qwen = build_tiny_vlm(tmp_path / "qwen", "qwen2_vl", TEXTS)
    llava = build_tiny_vlm(tmp_path / "llava", "llava", TEXTS)
    _, held_out = colour_image_task(tmp_path / "task", n_train=1, n_eval=2)
    assert main(["eval", "--model", str(qwen), "--ref", str(llava), "--prompts", str(held_out), "--out",
                 str(tmp_path / "e.json"), "--reward-fn", "directpo.eval.scorers:review_sentiment"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--ref {llava} is a llava model and --model {qwen} a qwen2_vl one" in err, err
    assert not (tmp_path / "e.json").exists()


def test_eval_command_with_images_writes_kl(vlms, tmp_path, capsys):
    """(5) `directpo eval --model VLM --prompts rows.jsonl --ref VLM2 --out X`: the results JSON with
    kl_mean (and the reward, a text function, and its win rate against the rows' chosen answers)."""
    _, pol_dir, _, ref_dir, _, _, held_out = vlms
    out, samples_out = tmp_path / "e.json", tmp_path / "s.jsonl"
    assert main(["eval", "--model", str(pol_dir), "--ref", str(ref_dir), "--prompts", str(held_out), "--out",
                 str(out), "--samples-out", str(samples_out), "--n", "2", "--max-new-tokens", "4",
                 "--reward-fn", "directpo.eval.scorers:review_sentiment", "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert isinstance(results["kl_mean"], float) and results["kl_samples"] + results["kl_excluded"] == 6
    assert results["image_prompts"] == 3 and results["num_prompts"] == 3
    assert results["reward_mean"] is not None and results["win_rate"] is not None
    rows = [json.loads(line) for line in samples_out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["prompt"][0]["content"][0] == {"type": "image"} for r in rows)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["kl_mean"] == results["kl_mean"]


def test_eval_with_images_samples_at_the_budgets_batch(vlms, tmp_path, monkeypatch):
    """`--memory-budget` with image prompts: the planner is handed the image prompts (ids with their
    image tokens, and their pictures) and the batch it chooses is the one sampled with and recorded."""
    from directpo.eval import evaluate

    _, pol_dir, _, ref_dir, _, _, held_out = vlms
    real, seen = evaluate.sampling_batch_size, []

    def recording(*args, **kw):
        seen.append(args[-1] is not None and len(args[-1]) == len(args[2]))  # the image prompts, one a row
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(evaluate, "sampling_batch_size", recording)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(pol_dir), "--ref", str(ref_dir), "--prompts", str(held_out), "--out",
                 str(out), "--n", "2", "--max-new-tokens", "3", "--memory-budget", "64GiB", "--batch-size", "1",
                 "--reward-fn", "directpo.eval.scorers:review_sentiment", "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert seen[0] is True and results["sampling_batch_size"] == seen[1] > 1  # a roomy budget: more than --batch-size
