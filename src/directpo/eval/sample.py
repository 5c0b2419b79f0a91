"""`directpo sample` and what `bon`, `eval`, PPO, online DPO and the studies draw through it: prompt
rows -> prompt ids (by the tokenizer, or for image prompts by a vision-language model's processor)
-> n samples each from the sampler (`eval.sampling`), decoded; the commands write them as JSONL as they go,
to `<out>.partial`, which a rerun continues (`draw_resumably`, `eval.partial`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..console import log
from ..data.errors import location
from ..data.formats import SkipReport
from ..data.prompts import PromptItem, encode_image_prompt, encode_prompt, load_prompts, refuse_images
from ..errors import UserValueError
from ..models import load_model_or_adapter, load_tokenizer, pick_device, suppress_eos
from .partial import Partial, run_settings
from .sampling import decode, generate_completions, sampling_batch_size


@dataclass
class Samples:
    """n completions for each prompt, prompt-major: sample j of prompt i at i * n + j; drawn in
    batches of `batch_size` rows (the samples depend on it)."""

    items: list[PromptItem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    n: int
    batch_size: int = 16
    # Image prompts: each sample's encoded prompt (`encode_image_prompt`: its image tensors, M-RoPE
    # positions), so what reads the samples again (eval's KL) gives the model what the sampler gave it.
    vision: list | None = None

    def prompt_of(self, k: int) -> PromptItem:
        return self.items[k // self.n]

    @property
    def prompts(self) -> list:
        return [self.items[k // self.n].prompt for k in range(len(self.texts))]

    def lengths(self, eos_id: int | None) -> list[int]:
        """Generated tokens per sample, the EOS not counted."""
        return [completion_length(c, eos_id) for c in self.completion_ids]


def completion_length(ids: list[int], eos_id: int | None) -> int:
    """Generated tokens of one completion, its closing EOS not counted."""
    return len(ids) - (1 if ids and ids[-1] == eos_id else 0)


def encode_samples(tokenizer, items: list[PromptItem], n: int, max_prompt_length: int | None = None
                   ) -> list[list[int]]:
    """The prompt ids of every sample: each prompt's, n times (prompt-major). Rows with images are
    refused (a tokenizer alone would drop them): `encode_image_samples` encodes those."""
    if n < 1:
        raise UserValueError(f"n must be ≥ 1, got {n}")
    refuse_images(items)
    encoded = [encode_prompt(it.prompt, tokenizer, max_prompt_length, it.source, it.row) for it in items]
    return [p for p in encoded for _ in range(n)]


def encode_image_samples(processor, items: list[PromptItem], n: int, max_prompt_length: int | None = None
                         ) -> list:
    """Each prompt encoded for a vision-language model (`encode_image_prompt`), n times (prompt-major)."""
    if n < 1:
        raise UserValueError(f"n must be ≥ 1, got {n}")
    encoded = [encode_image_prompt(it, processor, max_prompt_length) for it in items]
    return [e for e in encoded for _ in range(n)]


def check_context(model, items: list[PromptItem], prompt_ids: list[list[int]], n: int, max_new_tokens: int) -> None:
    """The longest prompt with its completion must fit the model's positions: past them a RoPE model
    reads positions it never learned and writes nonsense that looks like a result (learned positions:
    an IndexError), so it is refused naming the row and the flag that cuts it."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or not prompt_ids:
        return
    k = max(range(len(prompt_ids)), key=lambda j: len(prompt_ids[j]))
    if len(prompt_ids[k]) + max_new_tokens <= limit:
        return
    it, room = items[k // n], limit - max_new_tokens
    cut = f"pass --max-prompt-length {room} (prompts cut from the left)" if room > 0 else "lower --max-new-tokens"
    raise UserValueError(f"{it.source}, {location(it.source, it.row)}: a prompt of {len(prompt_ids[k])} tokens and "
                         f"--max-new-tokens {max_new_tokens} exceed the model's {limit} positions "
                         f"(max_position_embeddings); {cut}")


def plan_samples(model, tokenizer, items: list[PromptItem], n: int, max_new_tokens: int, top_p: float,
                 batch_size: int, max_prompt_length: int | None, memory_budget: str | None, processor) -> tuple:
    """(the prompt ids of every sample, their vision-language encodings or None, the batch to sample
    them in): `draw_samples` before it samples."""
    vision = None
    if processor is not None:
        vision = encode_image_samples(processor, items, n, max_prompt_length)
        prompt_ids = [v.prompt_ids for v in vision]
    else:
        prompt_ids = encode_samples(tokenizer, items, n, max_prompt_length)
    check_context(model, items, prompt_ids, n, max_new_tokens)
    batch_size = sampling_batch_size(model, tokenizer, prompt_ids, max_new_tokens, top_p, batch_size, memory_budget,
                                     vision)
    return prompt_ids, vision, batch_size


def draw_samples(model, tokenizer, items: list[PromptItem], n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 max_prompt_length: int | None = None, progress: str | None = None,
                 memory_budget: str | None = None, processor=None) -> Samples:
    """n samples of each prompt of `items`, `batch_size` rows at once, or with `memory_budget` as many
    as fit it (`sampling_batch_size`). With a `processor` (a vision-language `model`), prompts are
    encoded by it and sampled conditioned on their images."""
    prompt_ids, vision, batch_size = plan_samples(model, tokenizer, items, n, max_new_tokens, top_p, batch_size,
                                                  max_prompt_length, memory_budget, processor)
    comps = generate_completions(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, batch_size,
                                 progress, vision)
    return Samples(items, prompt_ids, comps, [decode(tokenizer, c) for c in comps], n, batch_size, vision)


def draw_resumably(model, tokenizer, items: list[PromptItem], n: int, partial: Partial, rows_of,
                   max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, max_prompt_length: int | None = None, progress: str | None = None,
                   memory_budget: str | None = None, processor=None) -> int:
    """`draw_samples` for a command that writes as it goes (`eval.partial`): after each batch, the
    prompts whose n samples are all drawn go through `rows_of(prompt indices, their completion ids)`
    ({prompt index: its rows}) into `partial`; batches whose prompts it holds already are not drawn
    again. Returns the batch sampled in."""
    if partial.batch_size is not None and memory_budget is not None:
        batch_size, memory_budget = partial.batch_size, None  # the batch the kept samples were drawn in
    prompt_ids, vision, batch_size = plan_samples(model, tokenizer, items, n, max_new_tokens, top_p, batch_size,
                                                  max_prompt_length, memory_budget, processor)
    partial.start(batch_size)
    kept, drawn = set(partial.done), {}
    if kept:
        log(f"{partial.path}: {len(kept)} of {len(items)} prompts done by an earlier run; sampling the rest")

    def on_batch(indices: list[int], comps: list[list[int]]) -> None:
        complete = []
        for k, c in zip(indices, comps):
            if k // n not in kept:
                got = drawn.setdefault(k // n, {})
                got[k % n] = c
                if len(got) == n:
                    complete.append(k // n)
        if complete:
            complete.sort()
            partial.add(rows_of(complete, [[drawn[i][j] for j in range(n)] for i in complete]))
            for i in complete:
                del drawn[i]

    with partial.kept(len(items)):
        generate_completions(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, batch_size,
                             progress, vision, skip=lambda indices: all(k // n in kept for k in indices),
                             on_batch=on_batch)
    return batch_size


def image_processor(model: str, items: list[PromptItem]):
    """The processor of `model` when prompts have images (None for text prompts): it must then be a
    vision-language model's directory; anything else is refused in one line before a model loads."""
    from ..models import is_adapter_dir
    from ..vision import is_vision_model, load_processor

    if not any(it.images for it in items):
        return None
    if is_adapter_dir(model):
        raise UserValueError(f"images in {items[0].source}, but --model {model} is an adapter directory: image "
                             "prompts are not sampled with adapters yet (issue #30); give the model's directory")
    if not is_vision_model(model):
        refuse_images(items)
    return load_processor(model)


def load_sampler(model: str, items: list[PromptItem], device: str | None = None) -> tuple:
    """(tokenizer, model, processor) to sample `items` with: with image prompts a vision-language
    model and its processor (`image_processor`), else the causal LM (an adapter directory: merged
    into its base) and processor None."""
    processor = image_processor(model, items)
    if processor is not None:
        from ..vision import load_vision_model

        return processor.tokenizer, load_vision_model(model, pick_device(device)), processor
    return load_tokenizer(model), load_model_or_adapter(model, pick_device(device)), None


def sample(model: str, prompts: str, out: str, n: int = 1, max_new_tokens: int = 128, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 16, max_prompt_length: int | None = None,
           device: str | None = None, on_invalid: str = "error", split: str | None = None,
           progress: bool = True, memory_budget: str | None = None, fixed_length: bool = False,
           overwrite: bool = False) -> dict:
    """Write one JSON line per sample: prompt_index, index (sample j of that prompt), prompt, completion.
    `memory_budget` (a size, e.g. '8GiB'): the batch that fits it instead of `batch_size`; the
    batch sampled with is in the result (`sampling_batch_size`). `fixed_length`: EOS never sampled.
    Written as it goes to `out`.partial, which a rerun continues (`eval.partial`; `overwrite`: not)."""
    report = SkipReport()
    items = load_prompts(prompts, on_invalid, split, report)
    partial = Partial(out, run_settings(model, prompts, device, n=n, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                        max_prompt_length=max_prompt_length, on_invalid=on_invalid, split=split,
                                        memory_budget=memory_budget, fixed_length=fixed_length), n, overwrite)
    tokenizer, policy, processor = load_sampler(model, items, device)
    suppress_eos(policy, tokenizer, fixed_length)
    eos = tokenizer.eos_token_id

    def rows_of(done: list[int], comps: list[list[list[int]]]) -> dict:
        return {i: [{"prompt_index": i, "index": j, "prompt": items[i].prompt, "completion": decode(tokenizer, c),
                     "completion_tokens": completion_length(c, eos),
                     "finished": bool(c) and c[-1] == eos} for j, c in enumerate(cs)] for i, cs in zip(done, comps)}

    used = draw_resumably(policy, tokenizer, items, n, partial, rows_of, max_new_tokens, temperature, top_p, seed,
                          batch_size, max_prompt_length, progress="sampling" if progress else None,
                          memory_budget=memory_budget, processor=processor)
    lengths = [r["completion_tokens"] for r in partial.finish()]
    log(f"sampled {len(lengths)} completions ({n} per prompt, {len(items)} prompts, batches of {used}; "
        f"{report.summary()}) -> {out}")
    return {"prompts": len(items), "samples": len(lengths), "skipped": report.total,
            "length_mean": sum(lengths) / len(lengths), "sampling_batch_size": used, "out": out}
