"""`inspect_data`'s dict out: a console summary, report.md, report.json, pairs.jsonl and figures."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import write_jsonl
from ..data.formats import location
from ..diskio import write_text

REPORT_FILES = ("report.md", "report.json", "pairs.jsonl", "lengths.png", "length_difference.png")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _where(ins: dict, row: int) -> str:
    return location(ins["data"], row)


def _facts(ins: dict) -> dict[str, list[tuple[str, str]]]:
    """The report's numbers, section by section: [(what, value)]."""
    c = ins["checks"]
    lb, d, tr, st = c["length_bias"], c["duplicates"], c["truncation"], c["special_tokens"]
    ts = ins["tokenize_stats"]
    lo, hi = lb["chosen_longer_ci95"]
    out = {
        "Duplicates and contradictions": [
            ("exact duplicate rows", f"{d['exact_duplicates']} ({_pct(d['duplicate_rate'])})"),
            ("same pair, preference reversed (A≻B and B≻A)", str(d["reversed_pairs"])),
            ("identical chosen/rejected", f"{d['identical_refused']} rows refused (kind 'identical'), "
                                          f"{d['identical_responses']} identical after tokenization"),
            ("distinct prompts", str(d["distinct_prompts"])),
            ("prompts with more than one pair", f"{d['prompts_with_several_pairs']} "
                                                f"({d['pairs_sharing_a_prompt']} pairs)"),
            ("most pairs for one prompt", ", ".join(f"{p['pairs']} ({_where(ins, p['first_row'])})"
                                                   for p in d["top_prompts"]) or "none")],
        "Length bias (untruncated responses, in tokens)": [
            ("pairs", str(lb["pairs"])),
            ("chosen longer", f"{lb['chosen_longer']} ({_pct(lb['chosen_longer_fraction'])}, 95 % CI "
                              f"{_pct(lo)}–{_pct(hi)})"),
            ("rejected longer", f"{lb['rejected_longer']} ({_pct(lb['rejected_longer_fraction'])})"),
            ("ties", str(lb["ties"])),
            ("chosen longer, ties left out", _pct(lb["chosen_longer_fraction_untied"])),
            ("median length difference (chosen − rejected)", f"{lb['median_length_difference']}"),
            ("mean length difference", "n/a" if lb["mean_length_difference"] is None
             else f"{lb['mean_length_difference']:.1f}")],
        "Truncation": [
            ("prompts cut (from the left)", f"{tr['prompts_cut']}"
             + (f" ({ts['prompts_cut_to_fit']} cut to max_length // 2 to fit)" if "prompts_cut_to_fit" in ts else "")),
            ("responses cut (from the right)", f"{tr['responses_cut']} of {tr['responses']}"),
            ("examples with a cut", str(tr["examples_with_a_cut"])),
            ("pairs with no response token left", f"{tr['no_response_tokens']} ({tr['refused_prompt_too_long']} "
                                                   "refused: prompt too long)"),
            ("pairs cut to identical chosen/rejected", str(tr["identical_after_truncation"]))],
        "Tokenization": [
            ("prompt/response boundary merges re-split", str(ts.get("boundary_merges", "n/a"))),
            ("prompts with a doubled BOS", str(st["prompts_doubled_bos"]) if st["checked_bos"] else "no BOS token"),
            ("rows with a doubled EOS", str(st["examples_doubled_eos"]) if st["checked_eos"] else "no EOS token"),
            ("responses not ending in EOS", f"{st['responses_missing_eos']} of {st['responses']} "
                                            f"({st['chosen_missing_eos']} chosen, {st['rejected_missing_eos']} "
                                            "rejected)" if st["checked_eos"] else "no EOS token")],
    }
    img = ins.get("images")
    if img:
        out["Images"] = _image_facts(img)
    ref = ins.get("reference")
    if ref:
        out["Reference model"] = [
            ("model", ref["model"]), ("pairs scored", str(ref["pairs"])),
            ("already prefers the chosen response", _pct(ref["accuracy"])),
            ("mean log-prob margin (chosen − rejected)", _num(ref["mean_margin"])),
            ("mean summed log-prob: chosen / rejected", f"{_num(ref['mean_chosen_logp'])} / "
                                                         f"{_num(ref['mean_rejected_logp'])}")]
    return out


def _image_facts(img: dict) -> list[tuple[str, str]]:
    per, w, h, sz = img["images_per_row"], img["width"], img["height"], img["size"]
    tokens = img["image_tokens_per_row"]
    return [("rows with images", f"{img['rows_with_images']} of {img['rows']}"),
            ("images", f"{img['images']} ({', '.join(f'{n} {f}' for f, n in img['formats'].items())})"),
            ("images per row (min / median / max)", f"{per['min']} / {per['median']} / {per['max']}"),
            ("size by pixels (smallest / median / largest)", f"{sz['min']} / {sz['median']} / {sz['max']}"),
            ("width, height (min–max)", f"{w['min']}–{w['max']}, {h['min']}–{h['max']}"),
            ("total image bytes (encoded)", f"{img['total_bytes']:,}" + (f" (+ {img['images_without_bytes']} "
                                                                         "in-memory images)"
                                                                         if img["images_without_bytes"] else "")),
            ("image tokens per row (min / median / max)", "n/a (read by their text alone: give --model a "
                                                         "vision-language model)" if tokens is None else
             f"{tokens['min']} / {tokens['median']} / {tokens['max']}")]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _rows_lines(ins: dict) -> list[str]:
    rows, inv = ins["rows"], ins["invalid"]
    lines = [f"{rows['read']} rows read, {rows['kept']} kept"]
    lines += [f"  {s}: {v['rows']} rows, {v['kept']} kept ({v['what']})" for s, v in rows["by_shape"].items()]
    if inv["total"]:
        lines.append(f"{inv['total']} invalid: " + ", ".join(f"{n} {k}" for k, n in inv["by_kind"].items()))
        lines += [f"  {k}, e.g. {msg}" for k, msg in inv["examples"].items()]
    return lines


def console_summary(ins: dict) -> str:
    """The report in a few lines for the terminal."""
    s = ins["settings"]
    lines = [f"directpo inspect {ins['data']} (tokenizer {s['tokenizer']}, max_length={s['max_length']}, "
             f"max_prompt_length={s['max_prompt_length']}, on_invalid={s['on_invalid']})"]
    lines += _rows_lines(ins)
    for section, facts in _facts(ins).items():
        lines.append(f"{section}:")
        lines += [f"  {what}: {value}" for what, value in facts]
    lines.append("Red flags:" if ins["red_flags"] else "No red flags.")
    lines += [f"  ! {f}" for f in ins["red_flags"]]
    return "\n".join(lines)


def markdown(ins: dict, figures: list[str]) -> str:
    s = ins["settings"]
    md = [f"# Data report: `{ins['data']}`", "",
          f"Read as `train` reads it: tokenizer `{s['tokenizer']}`, max_length={s['max_length']}, "
          f"max_prompt_length={s['max_prompt_length']}, on_invalid={s['on_invalid']}"
          + (f", split {s['data_split']}" if s["data_split"] else "") + ".", "", "## Summary", "", ins["paragraph"], ""]
    md += ["**Red flags**", ""] + [f"- {f}" for f in ins["red_flags"]] if ins["red_flags"] else ["No red flags."]
    md += ["", "## Rows", "", "| shape | rows | kept |", "| --- | --- | --- |"]
    md += [f"| {v['what']} | {v['rows']} | {v['kept']} |" for v in ins["rows"]["by_shape"].values()]
    inv = ins["invalid"]
    if inv["total"]:
        md += ["", f"{inv['total']} invalid rows" + (" (`train` stops at the first)" if "train_stops_at" in inv
                                                     else " (left out)") + ":", ""]
        md += [f"- {k}: {inv['by_kind'][k]}, e.g. `{msg}`" for k, msg in inv["examples"].items()]
    for section, facts in _facts(ins).items():
        md += ["", f"## {section}", "", "| | |", "| --- | --- |"] + [f"| {w} | {v} |" for w, v in facts]
    md += ["", "## Lengths (tokens)", "", "| | min | median | mean | p90 | p99 | max |", "| --- " * 7 + "|"]
    for view, parts in ins["lengths"].items():
        for part, q in parts.items():
            if q:
                md.append(f"| {part} ({view.replace('_', ' ')}) | {q['min']} | {q['median']} | {q['mean']:.1f} | "
                          f"{q['p90']} | {q['p99']} | {q['max']} |")
    md += ["", "## One example per shape", "", "As the model reads them (special tokens shown); `⟦|⟧` marks where "
           "the prompt ends and the response begins."]
    for shape, ex in ins["examples"].items():
        md += ["", f"### {shape} ({_where(ins, ex['row'])}, {ex['prompt_tokens']} prompt tokens)", "", "chosen:", "",
               "```text", ex["chosen"], "```"]
        if "rejected" in ex:
            md += ["", "rejected:", "", "```text", ex["rejected"], "```"]
    if figures:
        md += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(md) + "\n"


def write_figures(ins: dict, out: Path) -> list[str]:
    """lengths.png (prompt, chosen, rejected, untruncated) and length_difference.png (chosen − rejected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ins["per_pair"]]
    s = ins["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("prompt", "chosen", "rejected")):
        ax.hist([r[f"{key}_tokens"] for r in rows], bins=50, color="tab:blue" if key == "prompt" else
                "tab:green" if key == "chosen" else "tab:red")
        ax.set(title=f"{key} length", xlabel="tokens (untruncated)", ylabel="examples")
        if s["max_length"] is not None:
            ax.axvline(s["max_length"], color="k", ls="--", lw=1, label=f"max_length {s['max_length']}")
        if key == "prompt" and s["max_prompt_length"] is not None:
            ax.axvline(s["max_prompt_length"], color="gray", ls=":", lw=1, label="max_prompt_length")
        if s["max_length"] is not None:
            ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "lengths.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    diffs = [r["chosen_tokens"] - r["rejected_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(diffs, bins=60, color="tab:purple")
    ax.axvline(0, color="k", lw=1)
    lb = ins["checks"]["length_bias"]
    ax.set(title=f"chosen − rejected length: chosen longer in {_pct(lb['chosen_longer_fraction'])}",
           xlabel="tokens", ylabel="pairs")
    fig.tight_layout()
    paths.append(out / "length_difference.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]


def _write_text(path: Path, text: str) -> None:
    write_text(path, text)


def write_report(ins: dict, out: str | Path) -> list[str]:
    """report.md, report.json (everything but the per-pair rows), pairs.jsonl and the figures in
    `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(ins, out)
    write_jsonl(ins["per_pair"], out / "pairs.jsonl")
    _write_text(out / "report.json", json.dumps({k: v for k, v in ins.items() if k != "per_pair"}, indent=2,
                                                ensure_ascii=False) + "\n")
    _write_text(out / "report.md", markdown(ins, figures))
    return [str(out / "report.md"), str(out / "report.json"), str(out / "pairs.jsonl")] + figures
