"""Reddit TL;DR comparisons (Stiennon et al. 2020; `openai/summarize_from_feedback`, config
"comparisons") as prompt/chosen/rejected pairs.

A comparison row is

    {"info": {"post": str, "title": str, "subreddit": str, ...},
     "summaries": [{"text": str, ...}, {"text": str, ...}], "choice": 0 or 1, ...}

and becomes

    prompt   = "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"
    chosen   = " " + summaries[choice].text (stripped)
    rejected = " " + the other summary's text (stripped)

(the prompt format of the DPO paper's summarization experiments). Summaries are stripped and given
one leading space so that the boundary after "TL;DR:" tokenizes the same way for both responses, as
it did for neither in the raw data (whose summaries start with a space, or not, at random).

A malformed row is a `DataError` naming the file, the row and the field (`info.post`,
`summaries[1].text`, `choice`, ...), as everywhere in `directpo.data`. The dataset's validation
split also holds CNN/DailyMail rows (an `article`, no `post`): they are errors of `info.post`, to be
skipped (and counted) with on_invalid="skip".
"""
from __future__ import annotations

import os

from .formats import DataError, SkipReport, _short, check_unicode, is_hub_id, parse_records

HUB_CONFIG = "comparisons"


def format_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _info_text(info: dict, name: str, source: str, row: int) -> str:
    value = info.get(name)
    if value is None:
        raise DataError(source, row, f"info.{name}", "missing", kind="missing")
    if not isinstance(value, str):
        raise DataError(source, row, f"info.{name}", f"expected a string, got {type(value).__name__}", kind="type")
    if not value.strip():
        raise DataError(source, row, f"info.{name}", "empty", kind="missing")
    return value.strip()


def _summary_text(summaries: list, k: int, source: str, row: int) -> str:
    item = summaries[k]
    if not isinstance(item, dict):
        raise DataError(source, row, f"summaries[{k}]", f"expected an object with a 'text', got {_short(item)}",
                        kind="type")
    text = item.get("text")
    if not isinstance(text, str):
        what = "missing" if text is None else f"expected a string, got {type(text).__name__}"
        raise DataError(source, row, f"summaries[{k}].text", what, kind="missing" if text is None else "type")
    if not text.strip():
        raise DataError(source, row, f"summaries[{k}].text", "empty", kind="missing")
    return " " + text.strip()


def comparison_to_pair(rec: dict, source: str, row: int) -> dict:
    """One TL;DR comparison row as {"prompt", "chosen", "rejected"}, or a DataError naming the field."""
    info = rec.get("info")
    if not isinstance(info, dict):
        what = "missing" if info is None else f"expected an object, got {type(info).__name__}"
        raise DataError(source, row, "info", what + " (a TL;DR comparison row needs info.post/title/subreddit)",
                        kind="missing" if info is None else "type")
    post = _info_text(info, "post", source, row)
    title = _info_text(info, "title", source, row)
    subreddit = _info_text(info, "subreddit", source, row)
    summaries = rec.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(source, row, "summaries", f"expected a list of two {{\"text\": ...}} objects, got "
                                                  f"{_short(summaries)}", kind="invalid")
    choice = rec.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(source, row, "choice", f"expected 0 or 1 (the index of the preferred summary), got "
                                               f"{_short(choice)}", kind="invalid")
    texts = [_summary_text(summaries, k, source, row) for k in (0, 1)]
    if texts[0] == texts[1]:
        raise DataError(source, row, "summaries", "identical summaries: a pair needs two different responses",
                        kind="identical")
    pair = {"prompt": format_prompt(subreddit, title, post), "chosen": texts[choice], "rejected": texts[1 - choice]}
    check_unicode(pair, ("prompt", "chosen", "rejected"), source, row)
    return pair


def load_tldr_pairs(spec: str, split: str | None = None, config: str | None = HUB_CONFIG, on_invalid: str = "error",
                    report: SkipReport | None = None) -> list[dict]:
    """Every comparison of `spec` as a pair, in order: a JSONL/JSON/Parquet file of comparison rows,
    or a hub dataset (`openai/summarize_from_feedback`, `name:split` picks the split) loaded with
    its `config`. Bad rows raise a DataError (or are skipped and counted with on_invalid='skip')."""
    path = os.path.expanduser(spec)
    name, _, named_split = spec.partition(":")
    if os.path.exists(path) or not is_hub_id(name) or config is None:
        return parse_records(spec, comparison_to_pair, on_invalid, split, report, what="TL;DR comparisons")
    rows = _hub_rows(spec, name, config, split or named_split or "train")
    report = report if report is not None else SkipReport()
    pairs = []
    for row, rec in enumerate(rows):
        try:
            pairs.append(comparison_to_pair(dict(rec), spec, row))
        except DataError as e:
            if on_invalid == "error":
                raise
            report.add(e)
    if not pairs:
        raise DataError(spec, None, None, "no usable TL;DR comparisons" + (f": {report.summary()}"
                                                                         if report.total else ""))
    return pairs


def _hub_rows(spec: str, name: str, config: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
        raise DataError(spec, None, None, f"could not load config {config!r}, split {split!r} from the hub: {e}") from e
