"""`directpo inspect` and `directpo.data.checks`: counts on real HH pairs equal counts made here from
the raw rows and the tokenizer; planted duplicates, reversed pairs and identical responses are
found; --out writes the report; --model's log-probs are `directpo score`'s."""
from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import hh_rows
except ImportError:  # pragma: no cover
    from conftest import hh_rows
from directpo.cli import main, make_parser
from directpo.data import TokenizedExample, write_jsonl
from directpo.data.checks import (duplicates, length_bias, red_flags, special_tokens, summarize, summary_paragraph,
                                  wilson_interval)
from directpo.inspect import inspect_data

N_REAL = 500
ASSISTANT = "\n\nAssistant:"


def _split(chosen: str, rejected: str):
    """The HH rule, written out here: the prompt ends at the last "\\n\\nAssistant:" of the shared prefix."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen[:n].rfind(ASSISTANT) + len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real HH rows, then 7 exact copies, 5 reversed pairs and 3 identical chosen/rejected appended."""
    rows = hh_rows(N_REAL)
    extra = [dict(rows[i]) for i in range(10, 17)]                                     # duplicates
    extra += [{"chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]} for i in range(30, 35)]  # reversed
    extra += [{"chosen": rows[i]["chosen"], "rejected": rows[i]["chosen"]} for i in range(40, 43)]    # identical
    path = tmp_path_factory.mktemp("inspect") / "hh.jsonl"
    write_jsonl(rows + extra, path)
    return path, rows + extra


def _independent(rows, tok, max_length, max_prompt_length=None):
    """Every number the tests compare, from the raw rows and plain tokenizer calls."""
    eos = tok.eos_token_id
    valid, refused = [], Counter()
    for r in rows:
        prompt, c, rj = _split(r["chosen"], r["rejected"])
        if c == rj:  # (an empty response is a response: trained as the end of turn alone)
            refused["identical"] += 1
        else:
            valid.append((prompt, c, rj))
    out = Counter(refused)
    keys = set()
    diffs, prompt_cut, resp_cut = [], 0, 0
    for prompt, c, rj in valid:
        p = tok(prompt)["input_ids"]
        lens = [len(tok(prompt + x)["input_ids"]) - len(p) + 1 for x in (c, rj)]  # + the EOS appended
        diffs.append(lens[0] - lens[1])
        limit = max_prompt_length
        if limit is None and len(p) + max(lens) > max_length:
            limit = max_length // 2
        kept = min(len(p), limit) if limit is not None else len(p)
        prompt_cut += kept < len(p)
        resp_cut += sum(n > max_length - kept for n in lens)
        out["duplicates"] += (prompt, c, rj) in keys
        keys.add((prompt, c, rj))
    out["reversed"] = sum(1 for (p, a, b) in keys if a < b and (p, b, a) in keys)
    out.update(pairs=len(valid), longer=sum(d > 0 for d in diffs), ties=sum(d == 0 for d in diffs),
               prompts_cut=prompt_cut, responses_cut=resp_cut)
    return out, statistics.median(diffs)


@pytest.fixture(scope="module")
def inspected(planted, tiny_tokenizer):
    path, _ = planted
    return inspect_data(str(path), tiny_tokenizer, max_length=160, on_invalid="skip")


def test_counts_equal_an_independent_count_of_the_raw_rows(planted, inspected, tiny_tokenizer):
    _, rows = planted
    want, median = _independent(rows, tiny_tokenizer, max_length=160)
    c = inspected["checks"]
    lb, d, tr = c["length_bias"], c["duplicates"], c["truncation"]
    assert inspected["rows"]["read"] == len(rows) and inspected["rows"]["kept"] == want["pairs"]
    assert (lb["pairs"], lb["chosen_longer"], lb["ties"]) == (want["pairs"], want["longer"], want["ties"])
    assert lb["chosen_longer_fraction"] == pytest.approx(want["longer"] / want["pairs"])
    assert lb["median_length_difference"] == median
    lo, hi = lb["chosen_longer_ci95"]
    assert lo < lb["chosen_longer_fraction"] < hi
    assert d["exact_duplicates"] == want["duplicates"] == 7
    assert d["reversed_pairs"] == want["reversed"] == 5
    assert (tr["prompts_cut"], tr["responses_cut"]) == (want["prompts_cut"], want["responses_cut"])
    assert tr["prompts_cut"] > 0 and tr["responses_cut"] > 0 and tr["no_response_tokens"] == 0
    assert inspected["tokenize_stats"]["prompts_truncated"] == want["prompts_cut"]
    assert inspected["invalid"]["by_kind"] == {"identical": want["identical"]}


def test_truncation_counts_with_a_max_prompt_length(planted, tiny_tokenizer):
    path, rows = planted
    ins = inspect_data(str(path), tiny_tokenizer, max_length=200, max_prompt_length=64, on_invalid="skip")
    want, _ = _independent(rows, tiny_tokenizer, max_length=200, max_prompt_length=64)
    tr = ins["checks"]["truncation"]
    assert (tr["prompts_cut"], tr["responses_cut"]) == (want["prompts_cut"], want["responses_cut"])
    assert tr["refused_prompt_too_long"] == 0
    # the data's own numbers do not depend on the limits
    assert ins["checks"]["length_bias"]["chosen_longer"] == want["longer"]


def test_planted_rows_are_found_and_flagged(planted, inspected):
    _, rows = planted
    d = inspected["checks"]["duplicates"]
    n = N_REAL
    assert sorted(d["duplicate_rows"]) == [[i, n + i - 10] for i in range(10, 15)]  # the first 5 of 7 shown
    assert sorted(sorted(pair) for pair in d["reversed_rows"]) == [[i, n + 7 + i - 30] for i in range(30, 35)]
    assert d["identical_refused"] == 3 and inspected["invalid"]["by_kind"]["identical"] == 3
    assert "identical" in inspected["invalid"]["examples"]["identical"]
    assert "train_stops_at" not in inspected["invalid"]  # on_invalid='skip': left out, not a stop
    assert any("identical chosen and rejected" in f for f in inspected["red_flags"])
    assert d["prompts_with_several_pairs"] >= 12 and d["top_prompts"][0]["pairs"] >= 2


def test_on_invalid_error_reports_where_train_stops(tmp_path, tiny_tokenizer):
    rows = hh_rows(40)
    rows[5] = {"chosen": "only chosen"}
    write_jsonl(rows, tmp_path / "d.jsonl")
    ins = inspect_data(str(tmp_path / "d.jsonl"), tiny_tokenizer, on_invalid="error")
    assert "line 6" in ins["invalid"]["train_stops_at"] and "rejected" in ins["invalid"]["train_stops_at"]
    assert ins["red_flags"][0].startswith("1 invalid rows: `train`")
    assert ins["rows"]["kept"] == 39


def test_shapes_rendered_examples_and_special_tokens(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
            hh_rows(1)[0],
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello<|eos|>"}],
             "rejected": [{"role": "assistant", "content": "go away"}]},
            {"prompt": "<|bos|>rank", "responses": [" a", " bb", " ccc"], "ranking": [2, 1, 0]}]
    write_jsonl(rows, tmp_path / "d.jsonl")
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write("[1, 2]\n")
    ins = inspect_data(str(tmp_path / "d.jsonl"), tiny_tokenizer, on_invalid="skip")
    shapes = {k: (v["rows"], v["kept"]) for k, v in ins["rows"]["by_shape"].items()}
    assert shapes == {"explicit": (1, 1), "hh": (1, 1), "conversational": (1, 1), "ranked": (1, 1),
                      "unreadable": (1, 0)}
    ex = ins["examples"]
    assert ex["explicit"]["chosen"] == "Q: 2+2?⟦|⟧ 4<|eos|>"
    assert ex["conversational"]["rejected"].endswith("<|bos|>assistant\n⟦|⟧go away<|eos|>\n")
    assert ex["ranked"]["chosen"].endswith("⟦|⟧ ccc<|eos|>") and ex["ranked"]["rejected"].endswith("⟦|⟧ a<|eos|>")
    st = ins["checks"]["special_tokens"]
    assert st["examples_doubled_eos"] == 1  # "hello<|eos|>" + the template's own <|eos|>
    assert st["responses_missing_eos"] == 0
    assert any("doubled EOS" in f for f in ins["red_flags"])


def test_checks_on_hand_made_examples():
    bos, eos = 1, 2
    ex = [TokenizedExample([bos, bos, 5], [[7, 8, eos], [7, eos]], row=0),          # doubled BOS, chosen longer
          TokenizedExample([5], [[7, 8, 9], [7, 6, eos, eos]], row=1, responses_truncated=1),  # chosen cut
          TokenizedExample([5], [[7, eos], [8, eos]], row=2)]                        # a tie
    lb = length_bias(ex)
    assert (lb["chosen_longer"], lb["rejected_longer"], lb["ties"], lb["median_length_difference"]) == (1, 1, 1, 0)
    st = special_tokens(ex, bos, eos)
    assert (st["prompts_doubled_bos"], st["examples_doubled_eos"], st["responses_missing_eos"],
            st["chosen_missing_eos"]) == (1, 1, 1, 1)
    lo, hi = wilson_interval(1, 3)
    assert lo == pytest.approx(0.0615, abs=1e-3) and hi == pytest.approx(0.7923, abs=1e-3)
    rev = duplicates([TokenizedExample([5], [[7], [8]], row=0), TokenizedExample([5], [[8], [7]], row=1),
                      TokenizedExample([6], [[8], [7]], row=2), TokenizedExample([5], [[7], [8]], row=3)])
    assert (rev["reversed_pairs"], rev["reversed_rows"], rev["exact_duplicates"]) == (1, [[0, 1]], 1)
    assert rev["top_prompts"] == [{"pairs": 3, "first_row": 0}]
    biased = [TokenizedExample([5], [[7] * (3 + i % 2), [8, eos]], row=i) for i in range(10)]
    biased += [TokenizedExample([5], [[9, eos], [8]], row=10)] * 2 + [TokenizedExample([5], [[], [8]], row=12)]
    s = summarize(biased, type("T", (), {"bos_token_id": bos, "eos_token_id": eos})())
    flags = red_flags(s)
    assert any("the chosen response is the longer one" in f for f in flags)
    assert any("exact duplicate" in f for f in flags) and any("no response token" in f for f in flags)
    text = summary_paragraph(s)
    assert "Red flags:" in text and "\n" not in text and f"{s['examples']} examples" in text


def test_cli_out_writes_the_report_and_refuses_to_overwrite(tmp_path, tiny_model, capsys):
    write_jsonl(hh_rows(30), tmp_path / "d.jsonl")
    out = tmp_path / "report"
    argv = ["inspect", "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tiny_model), "--out", str(out),
            "--on-invalid", "skip", "--max-length", "256"]
    assert main(argv) == 0
    assert "Length bias" in capsys.readouterr().out
    for name in ("report.md", "report.json", "pairs.jsonl"):
        assert (out / name).stat().st_size > 0
    for name in ("lengths.png", "length_difference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["max_length"] == 256 and "reference" not in report
    assert "## Length bias" in (out / "report.md").read_text()
    assert len((out / "pairs.jsonl").read_text().splitlines()) == report["rows"]["kept"]
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["inspect", "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "give --model" in capsys.readouterr().err


def test_flags_parse():
    args = make_parser("inspect").parse_args(
        ["inspect", "--data", "D", "--model", "M", "--max-length", "none", "--max-prompt-length", "64",
         "--on-invalid", "skip", "--data-split", "test", "--out", "O", "--overwrite"])
    assert (args.max_length, args.max_prompt_length, args.on_invalid, args.data_split) == (None, 64, "skip", "test")


def test_model_reference_log_probs_are_score_s(tmp_path, tiny_model, one_thread, capsys):
    from directpo.eval.score import score

    write_jsonl(hh_rows(40), tmp_path / "d.jsonl")
    data, out = str(tmp_path / "d.jsonl"), tmp_path / "report"
    assert main(["inspect", "--data", data, "--model", str(tiny_model), "--out", str(out), "--on-invalid", "skip",
                 "--max-length", "256", "--no-progress", "--device", "cpu"]) == 0
    score(str(tiny_model), data, str(tmp_path / "scores.jsonl"), max_length=256, on_invalid="skip", device="cpu")
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [p["row"] for p in pairs] == [s["row"] for s in scored]
    for p, s in zip(pairs, scored):
        assert p["ref_chosen_logp"] == pytest.approx(s["chosen_logp"], rel=1e-5, abs=1e-4)
        assert p["ref_rejected_logp"] == pytest.approx(s["rejected_logp"], rel=1e-5, abs=1e-4)
    ref = json.loads((out / "report.json").read_text())["reference"]
    assert 0 <= ref["accuracy"] <= 1
    assert ref["accuracy"] == pytest.approx(sum(s["chosen_logp"] > s["rejected_logp"] for s in scored) / len(scored))



def test_model_on_unpaired_rows_scores_the_pairs_alone(tmp_path, tiny_model, tiny_tokenizer, one_thread):
    """Unpaired (labelled) rows beside pairs or completions were a traceback in the reference's
    collate ('a batch mixes unpaired ... examples with preference pairs'); inspect scores the pairs."""
    rows = [{"prompt": "The movie was", "chosen": " great", "rejected": " dull"},
            {"prompt": "The film was", "completion": " fine"},
            {"prompt": "The show was", "completion": " bad", "label": False}]
    write_jsonl(rows, tmp_path / "d.jsonl")
    ins = inspect_data(str(tmp_path / "d.jsonl"), tiny_tokenizer, model=str(tiny_model), device="cpu", progress=False)
    assert ins["rows"]["kept"] == 3 and ins["reference"]["pairs"] == 1
    write_jsonl(rows[1:], tmp_path / "u.jsonl")
    assert inspect_data(str(tmp_path / "u.jsonl"), tiny_tokenizer, model=str(tiny_model), device="cpu",
                        progress=False)["reference"]["pairs"] == 0

# ----------------------------------------------------------------------------------------------
# Images (issue #30, the data step): counts and sizes from the rows as written here

def _image_rows(tmp_path):
    """Rows with 1, 2 and 1 images of known sizes, a text row, and a row whose image is missing."""
    from PIL import Image

    sizes = {"a.png": (4, 3), "b.png": (10, 8), "c.jpg": (6, 6)}
    for name, size in sizes.items():
        Image.new("RGB", size, "red").save(tmp_path / name)
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]}]
    rows = [{"images": ["a.png"], "prompt": one, "chosen": "red", "rejected": "blue"},
            {"images": ["b.png", "c.jpg"], "prompt": two, "chosen": "no", "rejected": "yes"},
            {"image": "c.jpg", "prompt": one, "chosen": "red", "rejected": "green"},
            {"prompt": "text only", "chosen": "a", "rejected": "b"},
            {"images": ["gone.png"], "prompt": one, "chosen": "red", "rejected": "blue"}]
    write_jsonl(rows, tmp_path / "d.jsonl")
    return str(tmp_path / "d.jsonl"), sizes


def test_image_stats(tmp_path, tiny_tokenizer):
    import os

    data, sizes = _image_rows(tmp_path)
    ins = inspect_data(data, tiny_tokenizer, on_invalid="skip")
    img = ins["images"]
    assert (img["rows_with_images"], img["rows"], img["images"]) == (3, 4, 4)
    assert img["images_per_row"] == {"min": 1, "median": 1, "max": 2}
    used = [sizes["a.png"], sizes["b.png"], sizes["c.jpg"], sizes["c.jpg"]]
    assert img["width"] == {"min": min(w for w, _ in used), "median": statistics.median(w for w, _ in used),
                            "max": max(w for w, _ in used)}
    assert img["size"] == {"min": "4×3", "median": "6×6", "max": "10×8"}
    assert img["total_bytes"] == sum(os.path.getsize(tmp_path / n) for n in ("a.png", "b.png", "c.jpg", "c.jpg"))
    assert img["formats"] == {"JPEG": 2, "PNG": 2}
    assert img["image_tokens_per_row"] is None  # the processor hook: no number without a processor
    assert ins["invalid"]["by_kind"] == {"image_missing": 1}
    assert any("3 rows have images" in f and "give --model a vision-language model" in f for f in ins["red_flags"])
    shown = ins["examples"]["conversational"]["chosen"]  # measured by their text: no content list printed
    assert "colour?" in shown and "'type'" not in shown
    write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b"}], tmp_path / "t.jsonl")
    assert "images" not in inspect_data(str(tmp_path / "t.jsonl"), tiny_tokenizer)  # text data: no image section


def test_image_section_in_the_report(tmp_path, tiny_model, capsys):
    data, _ = _image_rows(tmp_path)
    out = tmp_path / "report"
    assert main(["inspect", "--data", data, "--tokenizer", str(tiny_model), "--out", str(out),
                 "--on-invalid", "skip"]) == 0
    console = capsys.readouterr().out
    assert "rows with images: 3 of 4" in console and "image tokens per row (min / median / max): n/a" in console
    md = (out / "report.md").read_text()
    assert "## Images" in md and "| images per row (min / median / max) | 1 / 1 / 2 |" in md
    assert json.loads((out / "report.json").read_text())["images"]["images"] == 4
