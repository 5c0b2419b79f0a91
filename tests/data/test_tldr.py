"""Reddit TL;DR comparison rows -> prompt/chosen/rejected pairs (`directpo.data.tldr`), and their
errors naming file, row and field."""
from __future__ import annotations

import json

import pytest

from directpo.data.formats import DataError, SkipReport
from directpo.data.tldr import comparison_to_pair, load_tldr_pairs


def row(choice=1, post="My landlord keeps the deposit.", title="Deposit?", subreddit="legaladvice",
        texts=(" he keeps my deposit", "landlord bad ")):
    return {"info": {"id": "t3_x", "post": post, "title": title, "subreddit": subreddit},
            "summaries": [{"text": t, "policy": "ref"} for t in texts], "choice": choice, "worker": "w1"}


def test_a_comparison_becomes_the_papers_prompt_and_the_chosen_summary():
    pair = comparison_to_pair(row(choice=1), "c.jsonl", 0)
    assert pair["prompt"] == ("SUBREDDIT: r/legaladvice\nTITLE: Deposit?\nPOST: My landlord keeps the deposit.\n"
                              "TL;DR:")
    # summaries[choice] is chosen; both stripped and given one leading space (one tokenization after "TL;DR:")
    assert (pair["chosen"], pair["rejected"]) == (" landlord bad", " he keeps my deposit")
    assert comparison_to_pair(row(choice=0), "c.jsonl", 0)["chosen"] == " he keeps my deposit"


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r["info"].pop("post"), "info.post", "missing"),
    (lambda r: r["info"].update(title=3), "info.title", "expected a string"),
    (lambda r: r.pop("info"), "info", "missing"),
    (lambda r: r["summaries"][1].update(text=None), "summaries[1].text", "missing"),
    (lambda r: r["summaries"][0].update(text=["x"]), "summaries[0].text", "expected a string"),
    (lambda r: r.update(summaries=[{"text": "a"}]), "summaries", "list of two"),
    (lambda r: r.update(choice=2), "choice", "0 or 1"),
    (lambda r: r.update(choice=True), "choice", "0 or 1"),
    (lambda r: r.update(summaries=[{"text": " same"}, {"text": "same "}]), "summaries", "identical"),
])
def test_a_malformed_row_names_file_row_and_field(change, field, words):
    bad = row()
    change(bad)
    with pytest.raises(DataError) as e:
        comparison_to_pair(bad, "comparisons.jsonl", 4)
    msg = str(e.value)
    assert msg.startswith("comparisons.jsonl, line 5, field ") and f"'{field}'" in msg and words in msg, msg
    assert "\n" not in msg


def test_a_file_reads_in_order_and_bad_rows_stop_it_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "tldr.jsonl"
    cnn = row()
    cnn["info"] = {"article": "CNN text", "title": "news", "subreddit": None, "post": None}  # the validation split's
    path.write_text("\n".join(json.dumps(r) for r in (row(0), cnn, row(1, post="Second post."))) + "\n")
    with pytest.raises(DataError, match=r"tldr\.jsonl, line 2, field 'info.post': missing"):
        load_tldr_pairs(str(path))
    report = SkipReport()
    pairs = load_tldr_pairs(str(path), on_invalid="skip", report=report)
    assert [p["prompt"].split("POST: ")[1] for p in pairs] == ["My landlord keeps the deposit.\nTL;DR:",
                                                              "Second post.\nTL;DR:"]
    assert report.total == 1 and report.counts == {"missing": 1}
    (tmp_path / "empty.jsonl").write_text(json.dumps(cnn) + "\n")
    with pytest.raises(DataError, match="no usable TL;DR comparisons"):
        load_tldr_pairs(str(tmp_path / "empty.jsonl"), on_invalid="skip")
