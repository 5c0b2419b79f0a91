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

from .data.formats import write_jsonl  # noqa: F401  (re-exported: `directpo.toy.write_jsonl` writes task files)

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
