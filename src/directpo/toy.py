"""Tiny local models and a built-in preference task: for the demo and the tests, no network needed.

`build_tiny_model` trains a byte-level BPE tokenizer on the spot and saves a randomly initialised
Llama with it, in Hugging Face format, so every code path is the real `from_pretrained` one.

`review_task` is the demo's preference task: a prompt "Review of <film>:" and two reviews built
from the same template with three adjectives each, the chosen one with two positive and one
negative, the rejected one with one positive and two negative, in random positions.
Held-out pairs use films and word combinations never seen in training, so implicit-reward accuracy
on them measures whether DPO learned the preference rather than memorising pairs.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from .data.formats import write_jsonl  # also `directpo.toy.write_jsonl`, for task files

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "charming", "clever", "beautiful", "gripping",
            "delightful", "superb", "warm", "fresh", "touching", "smart", "lovely"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "flat", "tedious", "silly", "ugly", "lifeless", "bland",
            "messy", "cold", "stale", "hollow", "weak", "painful"]
TEMPLATES = [" It was {a}, {b} and {c}.", " A {a} film: {b}, even {c}.", " {A} acting, {b} story, {c} ending.",
             " I found it {a} and {b}; the music was {c}."]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "pe", "ru", "bel", "cor", "na", "zi"]


def _film(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _review(rng: random.Random, template: str, n_pos: int, n_neg: int) -> str:
    words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, n_neg)
    rng.shuffle(words)
    a, b, c = words
    return template.format(a=a, b=b, c=c, A=a.capitalize())


def review_task(n_train: int = 256, n_eval: int = 64, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Prompt/chosen/rejected rows; eval films never appear in training."""
    rng = random.Random(seed)
    films = sorted({_film(rng) for _ in range(4 * (n_train + n_eval))})
    rng.shuffle(films)
    cut = len(films) * n_train // (n_train + n_eval)
    rows = {"train": [], "eval": []}
    for split, n, pool in (("train", n_train, films[:cut]), ("eval", n_eval, films[cut:])):
        for _ in range(n):
            t = rng.choice(TEMPLATES)
            # Both reviews mix praise and criticism; the chosen one has more praise. The rule holds
            # for any words, so it carries over to unseen films and combinations.
            rows[split].append({"prompt": f"Review of {rng.choice(pool)}:", "chosen": _review(rng, t, 2, 1),
                                "rejected": _review(rng, t, 1, 2)})
    return rows["train"], rows["eval"]


def ranked_review_task(n_train: int = 256, n_eval: int = 64, k: int = 4, seed: int = 0,
                       ) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Rows {prompt, responses, scores}: K reviews of three adjectives, scored by a hidden reward.

    Every adjective has a hidden weight (positive words > 0 on average, negative < 0, with spread);
    a review's reward is the sum of its adjectives' weights, and `scores` holds it, so the ranking
    is known exactly. Returns (train rows, eval rows, the hidden weights). Eval films are unseen.
    """
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE
    weight = {w: rng.gauss(1.0 if w in POSITIVE else -1.0, 0.7) for w in words}
    films = sorted({_film(rng) for _ in range(4 * (n_train + n_eval))})
    rng.shuffle(films)
    cut = len(films) * n_train // (n_train + n_eval)
    out = {"train": [], "eval": []}
    for split, n, pool in (("train", n_train, films[:cut]), ("eval", n_eval, films[cut:])):
        while len(out[split]) < n:
            t = rng.choice(TEMPLATES)
            reviews = []
            for _ in range(k):
                a, b, c = rng.sample(words, 3)
                reviews.append((template_fill(t, a, b, c), weight[a] + weight[b] + weight[c]))
            scores = [round(r, 6) for _, r in reviews]
            if len(set(scores)) < k or len({t for t, _ in reviews}) < k:
                continue  # strict rankings only
            out[split].append({"prompt": f"Review of {rng.choice(pool)}:", "responses": [t for t, _ in reviews],
                               "scores": scores})
    return out["train"], out["eval"], weight


def template_fill(template: str, a: str, b: str, c: str) -> str:
    return template.format(a=a, b=b, c=c, A=a.capitalize())


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = None,
                    add_bos: bool = False):
    """A byte-level BPE tokenizer trained on `texts` (specials <|pad|>, <|bos|>, <|eos|>), as a
    `PreTrainedTokenizerFast`.

    `add_bos`: the tokenizer starts every text with <|bos|> (as Llama's does), so a model trained on
    whole texts sees the same first token when it is later given a prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(out_dir: str | Path, texts: list[str], hidden: int = 64, layers: int = 2, heads: int = 4,
                     intermediate: int | None = None, vocab_size: int = 512, seed: int = 0,
                     chat_template: str | None = None, add_bos: bool = False) -> Path:
    """Train a byte-level BPE tokenizer on `texts` (`train_tokenizer`) and save it with a random
    Llama of the given size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .diskio import default_mode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = train_tokenizer(texts, vocab_size, chat_template, add_bos)
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=intermediate or 4 * hidden, max_position_embeddings=2048,
                         pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in out.glob("*.safetensors"):  # safetensors writes 0600
        default_mode(f)
    return out


# A minimal chat template (role headers, an end-of-turn marker), for conversational data in tests.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Tiny vision-language models (issue #30), built on the spot like `build_tiny_model`: random weights,
# a BPE tokenizer trained on the given texts with the family's image tokens added, a PIL image
# processor (no torchvision) and a chat template that renders `{"type": "image"}` parts into the
# family's image placeholder, all saved in one folder that `load_vision_model`/`load_processor` read.

VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3")
# The families placing tokens by M-RoPE (three position streams), whose towers take an image as patch rows.
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# Per family: the special tokens added to the tokenizer, and what one `{"type": "image"}` part renders
# as (the processor then expands the image token to one token per image patch group).
_QWEN_VL_TOKENS = (["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                   "<|vision_start|><|image_pad|><|vision_end|>")
_VLM_TOKENS = {
    "qwen2_vl": _QWEN_VL_TOKENS,
    "qwen2_5_vl": _QWEN_VL_TOKENS,
    "llava": (["<image>"], "<image>"),
    "llava_next": (["<image>"], "<image>"),
    "idefics3": (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"], "<image>"),
}


def vlm_chat_template(image_text: str) -> str:
    """SIMPLE_CHAT_TEMPLATE for multimodal messages: a message's content is a string or a list of
    parts, `{"type": "text", "text": ...}` rendered as its text and `{"type": "image"}` as `image_text`."""
    return (
        "{% for m in messages %}<|bos|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_text + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|eos|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
    )


def _text_config(tok, hidden: int, layers: int, heads: int) -> dict:
    return {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 2048, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def _qwen2_vl_parts(tok, template: str, hidden: int, layers: int, heads: int, image_size: int,
                    tower: dict):
    """Qwen2-VL: 14-px patches merged 2×2, so an image resized to about `image_size`² pixels (aspect
    kept, sides multiples of 28) becomes about (image_size/28)² image tokens; M-RoPE splits each
    head's rotary frequencies into (temporal, height, width) sections."""
    from transformers import Qwen2VLConfig

    vision = {"depth": tower["layers"], "embed_dim": tower["hidden"], "hidden_size": hidden,
              "num_heads": tower["heads"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return _qwen_vl(Qwen2VLConfig, "Qwen2VLProcessor", tok, template, hidden, layers, heads, image_size, vision)


def _qwen2_5_vl_parts(tok, template: str, hidden: int, layers: int, heads: int, image_size: int,
                      tower: dict):
    """Qwen2.5-VL: Qwen2-VL's patches, merging and M-RoPE, its tower attending within windows of
    28 px (one merged 2×2 group: an image of several groups is several windows, so the windowing is
    exercised) except in its full-attention blocks (every second one, none when the tower has one)."""
    from transformers import Qwen2_5_VLConfig

    vision = {"depth": tower["layers"], "hidden_size": tower["hidden"], "intermediate_size": 2 * tower["hidden"],
              "out_hidden_size": hidden, "num_heads": tower["heads"], "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 28,
              "fullatt_block_indexes": list(range(1, tower["layers"], 2))}
    return _qwen_vl(Qwen2_5_VLConfig, "Qwen2_5_VLProcessor", tok, template, hidden, layers, heads, image_size,
                    vision)


def _qwen_vl(config_class, processor_name: str, tok, template: str, hidden: int, layers: int, heads: int,
             image_size: int, vision: dict):
    from transformers import Qwen2VLImageProcessorPil

    from .vision import image_only_qwen2_vl_processor

    half = hidden // heads // 2  # rotary frequencies per head, split into temporal/height/width
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = tok.convert_tokens_to_ids
    text = _text_config(tok, hidden, layers, heads)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    config = config_class(
        text_config=text, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        vision_config=vision)
    # min = max pixels: every image is resized to about image_size² pixels, so a few image tokens each.
    pixels = image_size * image_size
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})
    return config, image_only_qwen2_vl_processor(images, tok, template, processor_name)


def _clip_tower(tower: dict, image_size: int):
    """The CLIP vision tower of the LLaVA families, on 14-px patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=tower["hidden"], intermediate_size=2 * tower["hidden"],
                            num_hidden_layers=tower["layers"], num_attention_heads=tower["heads"],
                            image_size=image_size, patch_size=14)


def _llava_parts(tok, template: str, hidden: int, layers: int, heads: int, image_size: int,
                 tower: dict):
    """LLaVA: a one-layer CLIP vision tower on 14-px patches; its CLS feature dropped ("default"
    strategy), so an image is (image_size/14)² image tokens."""
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaProcessor

    vision = _clip_tower(tower, image_size)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config(tok, hidden, layers, heads)),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, chat_template=template,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    return config, processor


def _llava_next_parts(tok, template: str, hidden: int, layers: int, heads: int, image_size: int,
                      tower: dict):
    """LLaVA-NeXT ("anyres"): LLaVA's CLIP tower on `image_size`-px crops; an image becomes its
    resized whole plus the crops of the grid (of `image_size` cells, 1×1 to 2×2) that fits its aspect
    best, so how many crops and image tokens it gets depends on its size (with `image_sizes` the
    model drops the grid's padding and adds a newline feature per row)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    vision = _clip_tower(tower, image_size)
    grid = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    config = LlavaNextConfig(vision_config=vision,
                             text_config=LlamaConfig(**_text_config(tok, hidden, layers, heads)),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_grid_pinpoints=grid,
                             tie_word_embeddings=False)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                        crop_size={"height": image_size, "width": image_size},
                                        image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14, chat_template=template,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1)
    return config, processor


def _idefics3_parts(tok, template: str, hidden: int, layers: int, heads: int, image_size: int,
                    tower: dict):
    """Idefics3 (SmolVLM's architecture): a one-layer SigLIP-style tower on 14-px patches, the
    connector's pixel shuffle merging 2×2 patches, image splitting off: an image is one
    `<fake_token_around_image><global-img>` block of (image_size/28)² image tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    config = Idefics3Config(
        vision_config={"hidden_size": tower["hidden"], "intermediate_size": 2 * tower["hidden"],
                       "num_hidden_layers": tower["layers"], "num_attention_heads": tower["heads"],
                       "image_size": image_size, "patch_size": 14},
        text_config=LlamaConfig(**_text_config(tok, hidden, layers, heads)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False)
    images = Idefics3ImageProcessorPil(size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
                                       do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=template,
                                  image_seq_len=(image_size // 28) ** 2)
    return config, processor


_VLM_PARTS = {"qwen2_vl": _qwen2_vl_parts, "qwen2_5_vl": _qwen2_5_vl_parts, "llava": _llava_parts,
              "llava_next": _llava_next_parts, "idefics3": _idefics3_parts}


def build_tiny_vlm(out_dir: str | Path, family: str, texts: list[str], hidden: int = 64, layers: int = 2,
                   heads: int = 4, vocab_size: int = 512, image_size: int = 56, seed: int = 0,
                   vision_layers: int = 1, vision_hidden: int = 32, vision_heads: int = 2) -> Path:
    """A random vision-language model of `family` (`VLM_FAMILIES`) with its processor, saved in
    `out_dir`: loadable with `AutoModelForImageTextToText` and `directpo.vision.load_processor`.
    `vision_layers`/`vision_hidden`/`vision_heads`: the vision tower's depth, width and heads (the
    defaults keep the tests' tower negligible; the vision bench makes it matter)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .diskio import default_mode
    from .vision import save_processor

    if family not in _VLM_PARTS:
        raise ValueError(f"family: {family!r}; choose one of {', '.join(VLM_FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials, image_text = _VLM_TOKENS[family]
    tok = train_tokenizer(texts, vocab_size)
    tok.add_special_tokens({"additional_special_tokens": specials})
    template = vlm_chat_template(image_text)
    tok.chat_template = template
    tower = {"layers": vision_layers, "hidden": vision_hidden, "heads": vision_heads}
    config, processor = _VLM_PARTS[family](tok, template, hidden, layers, heads, image_size, tower)
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    save_processor(processor, out)
    for f in out.glob("*.safetensors"):  # safetensors writes 0600
        default_mode(f)
    return out


# The synthetic image task: a picture of one dominant colour; the chosen answer names it.
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 40)}
COLOUR_QUESTION = "What colour is this picture?"


def _colour_image(rng: random.Random, rgb: tuple[int, int, int], size: int):
    """`rgb` with per-pixel noise, and a few pixels of another colour."""
    from PIL import Image

    img = Image.new("RGB", (size, size))
    others = [c for c in COLOURS.values() if c != rgb]
    pixels = [rng.choice(others) if rng.random() < 0.1
              else tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in rgb) for _ in range(size * size)]
    img.putdata(pixels)
    return img


def colour_image_task(out_dir: str | Path, n_train: int = 64, n_eval: int = 16, seed: int = 0,
                      size: int = 56) -> tuple[Path, Path]:
    """Writes `img/NNN.png` (one dominant colour each, the colours in turn so they are balanced) and
    `train.jsonl`/`eval.jsonl` in TRL's vision preference format: `images` (paths relative to the
    JSONL), a conversational `prompt` with an image part, `chosen` naming the colour, `rejected`
    another. Returns the two JSONL paths."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n_train + n_eval):
        colour = names[i % len(names)]
        image = f"img/{i:03d}.png"
        _colour_image(rng, COLOURS[colour], size).save(out / image)
        wrong = rng.choice([c for c in names if c != colour])
        rows.append({"images": [image],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": COLOUR_QUESTION}]}],
                     "chosen": [{"role": "assistant", "content": f"It is {colour}."}],
                     "rejected": [{"role": "assistant", "content": f"It is {wrong}."}]})
    train, held_out = rows[:n_train], rows[n_train:]
    rng.shuffle(train)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held_out, out / "eval.jsonl")
    return out / "train.jsonl", out / "eval.jsonl"
