"""Cheap checks of tokenized preference data: what a run is about to learn from, before step 1.

Each check takes `TokenizedExample`s (as `tokenize_examples` returns them) and returns a plain dict
(JSON-ready: numbers, strings, lists), so the training loop can log them and `directpo inspect` can
put them in its report. A pair is an example's best and worst response (`responses[0]` and
`responses[-1]`; for a two-response row: chosen and rejected).

* `length_bias`      how often the chosen response is the longer one (Wilson 95 % interval), the
                     median length difference (chosen − rejected, tokens) and ties
* `duplicates`       exact duplicate rows, the same pair with the preference reversed (A≻B and B≻A),
                     identical chosen/rejected, the prompts with the most pairs
* `truncation`       prompts cut, responses cut, pairs left with no response tokens or with two
                     identical responses (from the examples' flags, the `TokenizeStats` and the
                     `SkipReport` of the tokenization)
* `special_tokens`   doubled BOS in a prompt, doubled EOS in a response, responses missing EOS
* `summarize`        all of them in one dict; `red_flags(summary)` lists what looks wrong, and
                     `summary_paragraph(summary)` says it in one paragraph

Lengths are token counts of what the model is scored on: response ids include the EOS that
`tokenize_example` appends to text rows (the same +1 for chosen and rejected). `summarize` measures
length bias and duplicates on the untruncated examples when given them (`directpo inspect`), else
on the examples as trained, after truncation to max_length (`train`'s paragraph); the summary's
`length_bias["basis"]` says which, and so do the paragraph and the red flag, since the two differ
when responses are cut.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Iterable

import torch

from .formats import SkipReport
from .tokenize import TokenizedExample, TokenizeStats

# What `red_flags` calls wrong. Fractions are of the pairs (or of the responses, for EOS).
THRESHOLDS = {
    "chosen_longer": 0.70,        # the chosen response is the longer one in more than 70 % of pairs (or the
                                  # rejected one is): the loss can be lowered by length alone
    "no_response_tokens": 0.01,   # pairs truncated to no response token, or refused for a too long prompt
    "identical_after_truncation": 0.01,  # chosen and rejected cut to the same tokens: no preference left
    "duplicates": 0.05,           # exact duplicate rows
    "reversed": 0.01,             # pairs that also occur with the preference reversed
    "responses_truncated": 0.10,  # responses cut from the right (they lose their EOS)
    "missing_eos": 0.10,          # responses that do not end in EOS
    "skipped": 0.05,              # rows left out as invalid (on_invalid='skip')
}
EOS_TAIL = 2  # a chat template may close a turn with EOS and a newline: EOS among the last 2 tokens counts
TOP_PROMPTS = 5


def _pairs(examples: Iterable[TokenizedExample]) -> list[TokenizedExample]:
    return [ex for ex in examples if len(ex.response_ids) >= 2]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95 % for z = 1.96); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def length_bias(examples: Iterable[TokenizedExample]) -> dict:
    """How often the chosen response is longer (in tokens) than the rejected one."""
    diffs = [len(ex.response_ids[0]) - len(ex.response_ids[-1]) for ex in _pairs(examples)]
    n = len(diffs)
    longer = sum(d > 0 for d in diffs)
    shorter = sum(d < 0 for d in diffs)
    lo, hi = wilson_interval(longer, n)
    return {"pairs": n, "chosen_longer": longer, "rejected_longer": shorter, "ties": n - longer - shorter,
            "chosen_longer_fraction": longer / n if n else None, "chosen_longer_ci95": [lo, hi],
            "rejected_longer_fraction": shorter / n if n else None,
            "chosen_longer_fraction_untied": longer / (longer + shorter) if longer + shorter else None,
            "median_length_difference": statistics.median(diffs) if diffs else None,
            "mean_length_difference": statistics.fmean(diffs) if diffs else None}


def duplicates(examples: Iterable[TokenizedExample], top: int = TOP_PROMPTS) -> dict:
    """Exact duplicates (same prompt and responses in the same order), reversed pairs (a prompt
    with chosen A over rejected B in one row and B over A in another; counted once per unordered
    pair), identical chosen/rejected, and the prompts with the most pairs. Rows are the examples'
    `row`s (0-based), first occurrence first; sequences are compared by a 64-bit hash of their ids
    (only the hashes are kept, so memory stays small on large sets)."""
    examples = list(examples)
    seen: dict[tuple, int] = {}
    dup_rows: list[list[int]] = []
    ordered: dict[tuple, int] = {}
    per_prompt: dict[int, list[int]] = defaultdict(list)
    n_dup = identical = 0
    for ex in examples:
        p = _prompt_key(ex)
        responses = [hash(tuple(r)) for r in ex.response_ids]
        key = (p, *responses)
        if key in seen:
            n_dup += 1
            if len(dup_rows) < top:
                dup_rows.append([seen[key], ex.row])
        else:
            seen[key] = ex.row
        per_prompt[p].append(ex.row)
        if len(responses) >= 2:
            a, b = responses[0], responses[-1]
            identical += a == b and not ex.responses_truncated  # cut to the same tokens: see `truncation`
            ordered.setdefault((p, a, b), ex.row)
    reversed_rows = sorted(sorted([row, ordered[(p, b, a)]]) for (p, a, b), row in ordered.items()
                           if a < b and (p, b, a) in ordered)
    many = sorted((rows for rows in per_prompt.values() if len(rows) > 1), key=lambda r: (-len(r), r[0]))
    return {"examples": len(examples), "pairs": len(_pairs(examples)), "exact_duplicates": n_dup,
            "duplicate_rate": n_dup / len(examples) if examples else 0.0, "duplicate_rows": dup_rows,
            "reversed_pairs": len(reversed_rows), "reversed_rows": reversed_rows[:top],
            "identical_responses": identical, "distinct_prompts": len(per_prompt),
            "prompts_with_several_pairs": len(many), "pairs_sharing_a_prompt": sum(map(len, many)),
            "top_prompts": [{"pairs": len(rows), "first_row": rows[0]} for rows in many[:top]]}


def _prompt_key(ex: TokenizedExample) -> int:
    """A prompt's hash: its ids, and an image row's pixels (the same question about two pictures is
    two prompts)."""
    images = getattr(ex, "vision", None) or {}
    if getattr(images, "digest", None) is not None:  # made on demand: the hash of its images
        return hash((tuple(ex.prompt_ids), images.digest))
    return hash((tuple(ex.prompt_ids), *(bytes(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
                                          for _, t in sorted(images.items()))))


def truncation(examples: Iterable[TokenizedExample], stats: TokenizeStats | None = None,
               report: SkipReport | None = None) -> dict:
    """What the truncation at max_length / max_prompt_length did: from the examples' flags, and
    from the tokenization's `TokenizeStats` and `SkipReport` when given (rows refused because their
    prompt left no room for a response are counted there, kind 'prompt_too_long')."""
    examples = list(examples)
    pairs = _pairs(examples)
    refused = report.counts.get("prompt_too_long", 0) if report is not None else 0
    empty = sum(any(len(r) == 0 for r in ex.response_ids) for ex in examples)
    same = sum(ex.responses_truncated > 0 and ex.response_ids[0] == ex.response_ids[-1] for ex in pairs)
    out = {"examples": len(examples), "prompts_cut": sum(ex.prompt_truncated for ex in examples),
           "responses_cut": sum(ex.responses_truncated for ex in examples),
           "examples_with_a_cut": sum(ex.prompt_truncated or ex.responses_truncated > 0 for ex in examples),
           "responses": sum(len(ex.response_ids) for ex in examples),
           "no_response_tokens": empty + refused, "refused_prompt_too_long": refused,
           "identical_after_truncation": same}
    if stats is not None:
        out["tokenize_stats"] = asdict(stats)
    return out


def special_tokens(examples: Iterable[TokenizedExample], bos_id: int | None = None,
                   eos_ids: int | Iterable[int] | None = None) -> dict:
    """Doubled BOS (two in a row) in prompts, doubled EOS in responses, and responses with no EOS
    among their last `EOS_TAIL` tokens (cut by truncation, or a chat template that does not end
    its turns with EOS). `eos_ids`: the EOS id, or every id that ends a turn."""
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    examples = list(examples)
    doubled_bos = sum(bos_id is not None and _doubled(ex.prompt_ids, {bos_id}) for ex in examples)
    doubled_eos = sum(bool(eos) and any(_doubled(r, eos) for r in ex.response_ids) for ex in examples)
    missing = Counter()
    for ex in examples:
        for k, r in enumerate(ex.response_ids):
            if eos and not eos.intersection(r[-EOS_TAIL:]):
                missing["responses"] += 1
                missing["chosen" if k == 0 else "rejected" if k == len(ex.response_ids) - 1 else "middle"] += 1
    return {"checked_eos": bool(eos), "checked_bos": bos_id is not None, "prompts_doubled_bos": doubled_bos,
            "examples_doubled_eos": doubled_eos, "responses": sum(len(ex.response_ids) for ex in examples),
            "responses_missing_eos": missing["responses"], "chosen_missing_eos": missing["chosen"],
            "rejected_missing_eos": missing["rejected"]}


def _doubled(ids: list[int], which: set[int]) -> bool:
    return any(a in which and b in which for a, b in zip(ids, ids[1:]))


def skipped(report: SkipReport | None) -> dict:
    """Rows left out as invalid, by kind, with the first message of each kind."""
    if report is None:
        return {"total": 0, "by_kind": {}, "examples": {}}
    return {"total": report.total, "by_kind": dict(sorted(report.counts.items())), "examples": dict(report.first)}


def summarize(examples: list[TokenizedExample], tokenizer=None, stats: TokenizeStats | None = None,
              report: SkipReport | None = None, full: list[TokenizedExample] | None = None) -> dict:
    """Every check in one dict. `examples`: the tokenized (truncated) examples a run trains on;
    `full`: the same examples untruncated, when at hand, for the checks of the data itself
    (length bias, duplicates); `tokenizer` (only its `bos_token_id` / `eos_token_id` are read)
    for the special-token checks; `stats` / `report`: the tokenization's."""
    data = full if full is not None else examples
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = {"examples": len(examples), "pairs": len(_pairs(examples)), "length_bias": length_bias(data),
           "duplicates": duplicates(data), "truncation": truncation(examples, stats, report),
           "special_tokens": special_tokens(examples, bos, eos), "skipped": skipped(report)}
    out["length_bias"]["basis"] = "untruncated" if full is not None else "as trained"
    out["duplicates"]["identical_refused"] = report.counts.get("identical", 0) if report is not None else 0
    if stats is not None:
        out["boundary_merges"] = getattr(stats, "boundary_merges", 0)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# What a length-bias number was measured on (`summarize`'s "basis"), in the flag and in the paragraph.
_BASIS_FLAG = {"as trained": " (as trained, after truncation)", "untruncated": " (before truncation)"}
_BASIS_LEAD = {"as trained": "As trained (in tokens after truncation to --max-length; `directpo inspect` counts "
                             "the untruncated responses), the chosen",
               "untruncated": "Before truncation, the chosen"}


def red_flags(summary: dict, fixed_length: bool = False) -> list[str]:
    """One line for each check of `summarize`'s dict beyond its `THRESHOLDS` (`fixed_length`: the
    responses are completions that never end, so none ending in EOS is no flag)."""
    t, flags = THRESHOLDS, []
    n = max(summary.get("pairs", 0), 1)
    lb = summary.get("length_bias", {})
    for side in ("chosen", "rejected"):
        frac = lb.get(f"{side}_longer_fraction")
        if frac is not None and frac > t["chosen_longer"]:
            lo, hi = lb["chosen_longer_ci95"] if side == "chosen" else (None, None)
            ci = f" (95 % CI {_pct(lo)}–{_pct(hi)})" if lo is not None else ""
            flags.append(f"length bias{_BASIS_FLAG.get(lb.get('basis'), '')}: the {side} response is the longer "
                         f"one in {_pct(frac)} of pairs{ci}; a policy can lower the loss by length alone")
    tr = summary.get("truncation", {})
    if tr.get("no_response_tokens", 0) / n > t["no_response_tokens"]:
        flags.append(f"{tr['no_response_tokens']} pairs ({_pct(tr['no_response_tokens'] / n)}) have no response "
                     "token left within max_length (raise max_length, or lower max_prompt_length)")
    if tr.get("identical_after_truncation", 0) / n > t["identical_after_truncation"]:
        flags.append(f"{tr['identical_after_truncation']} pairs are cut to identical chosen/rejected tokens: "
                     "no preference left to learn")
    responses = max(tr.get("responses", 0), 1)
    if tr.get("responses_cut", 0) / responses > t["responses_truncated"]:
        flags.append(f"{_pct(tr['responses_cut'] / responses)} of responses are cut at max_length (they lose "
                     "their EOS: the policy is not taught to stop)")
    d = summary.get("duplicates", {})
    if d.get("duplicate_rate", 0) > t["duplicates"]:
        flags.append(f"{d['exact_duplicates']} exact duplicate rows ({_pct(d['duplicate_rate'])})")
    if d.get("reversed_pairs", 0) / n > t["reversed"]:
        flags.append(f"{d['reversed_pairs']} pairs also occur with the preference reversed (A≻B and B≻A): "
                     "contradictory labels")
    if d.get("identical_responses", 0) or d.get("identical_refused", 0):
        flags.append(f"{d.get('identical_responses', 0) + d.get('identical_refused', 0)} rows have identical "
                     "chosen and rejected responses")
    flags += _special_token_flags(summary.get("special_tokens", {}), fixed_length)
    sk = summary.get("skipped", {})
    total = sk.get("total", 0)
    if total and total / (total + summary.get("examples", 0)) > t["skipped"]:
        flags.append(f"{total} rows ({_pct(total / (total + summary.get('examples', 0)))}) are invalid and left out")
    return flags


def _special_token_flags(st: dict, fixed_length: bool = False) -> list[str]:
    flags = []
    if st.get("prompts_doubled_bos", 0):
        flags.append(f"{st['prompts_doubled_bos']} prompts start with a doubled BOS (the text or chat template "
                     "already holds BOS and the tokenizer adds another)")
    if st.get("examples_doubled_eos", 0):
        flags.append(f"{st['examples_doubled_eos']} rows have a response with a doubled EOS")
    responses = max(st.get("responses", 0), 1)
    if not fixed_length and st.get("responses_missing_eos", 0) / responses > THRESHOLDS["missing_eos"]:
        flags.append(f"{_pct(st['responses_missing_eos'] / responses)} of responses do not end in EOS "
                     f"({st['chosen_missing_eos']} chosen, {st['rejected_missing_eos']} rejected)")
    return flags


def summary_paragraph(summary: dict, flags: list[str] | None = None) -> str:
    """`summarize`'s dict in one paragraph of plain text, ending with its red flags (`flags`, when
    given, instead of `red_flags(summary)`)."""
    n = summary.get("pairs", 0)
    lb, d, tr = summary.get("length_bias", {}), summary.get("duplicates", {}), summary.get("truncation", {})
    st, sk = summary.get("special_tokens", {}), summary.get("skipped", {})
    parts = [f"{summary.get('examples', 0)} examples ({n} with two or more responses)"]
    if sk.get("total"):
        parts[0] += f", {sk['total']} invalid rows ({', '.join(f'{v} {k}' for k, v in sk['by_kind'].items())})"
    parts[0] += "."
    if lb.get("pairs"):
        lo, hi = lb["chosen_longer_ci95"]
        lead = _BASIS_LEAD.get(lb.get("basis"), "The chosen")
        parts.append(f"{lead} response is the longer one in {_pct(lb['chosen_longer_fraction'])} of pairs "
                     f"(95 % CI {_pct(lo)}–{_pct(hi)}; {lb['ties']} ties), median length difference "
                     f"{lb['median_length_difference']:+g} tokens.")
    parts.append(f"{d.get('exact_duplicates', 0)} exact duplicates, {d.get('reversed_pairs', 0)} reversed pairs, "
                 f"{d.get('identical_responses', 0) + d.get('identical_refused', 0)} identical chosen/rejected; "
                 f"{d.get('prompts_with_several_pairs', 0)} prompts have more than one pair.")
    parts.append(f"Truncation cut {tr.get('prompts_cut', 0)} prompts and {tr.get('responses_cut', 0)} responses; "
                 f"{tr.get('no_response_tokens', 0)} pairs have no response token left.")
    if st.get("checked_eos") or st.get("checked_bos"):
        parts.append(f"{st.get('responses_missing_eos', 0)} responses do not end in EOS, "
                     f"{st.get('prompts_doubled_bos', 0)} prompts have a doubled BOS, "
                     f"{st.get('examples_doubled_eos', 0)} rows a doubled EOS.")
    flags = red_flags(summary) if flags is None else flags
    parts.append(f"Red flags: {'; '.join(flags)}." if flags else "No red flags.")
    return " ".join(parts)
