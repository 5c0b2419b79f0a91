"""`directpo score` on rows that are not plain pairs: a prompt/completion row (SFT or unpaired) is an
error of its row (or, with --on-invalid skip, a counted skip), never a traceback or a NaN margin; a
ranking of K > 2 reports its best and its worst response, as `Example.rejected` and inspect do."""
import json

import pytest

from directpo.cli import main
from directpo.data.formats import DataError, write_jsonl
from directpo.eval.score import score

PAIR = {"prompt": "The movie was", "chosen": " great fun", "rejected": " dull"}
SFT = {"prompt": "The film was", "completion": " fine"}
KTO = {"prompt": "The show was", "completion": " bad", "label": False}


@pytest.mark.parametrize("rows", [[SFT], [PAIR, SFT], [PAIR, KTO], [KTO, SFT]])
def test_a_prompt_completion_row_is_an_error_of_its_line(tiny_model, tmp_path, one_thread, rows):
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    line = 1 + next(i for i, r in enumerate(rows) if "completion" in r)
    with pytest.raises(DataError, match=rf"d\.jsonl, line {line}, field 'rejected': missing: score reads pairs"):
        score(str(tiny_model), str(data), str(tmp_path / "s.jsonl"), device="cpu")
    assert not (tmp_path / "s.jsonl").exists()


def test_skipped_prompt_completion_rows_are_counted(tiny_model, tmp_path, one_thread, capsys):
    data = write_jsonl([PAIR, SFT, KTO], tmp_path / "d.jsonl")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--on-invalid", "skip"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 1 and result["skipped"] == 2 and result["mean_margin"] == result["mean_margin"]
    assert [json.loads(x)["row"] for x in out.read_text().splitlines()] == [0]
    with pytest.raises(DataError, match="no pairs to score"):
        score(str(tiny_model), str(write_jsonl([SFT], tmp_path / "e.jsonl")), str(out), device="cpu",
              on_invalid="skip")


def test_a_ranking_reports_its_best_and_worst_response(tiny_model, tmp_path, one_thread):
    ranked = {"prompt": "The movie was", "responses": [" dull", " great fun", " ok I guess it was"],
              "ranking": [1, 2, 0]}
    pair = {"prompt": "The movie was", "chosen": " great fun", "rejected": " dull"}
    out = tmp_path / "s.jsonl"
    score(str(tiny_model), str(write_jsonl([ranked], tmp_path / "r.jsonl")), str(out), device="cpu")
    got = json.loads(out.read_text())
    score(str(tiny_model), str(write_jsonl([pair], tmp_path / "p.jsonl")), str(tmp_path / "s2.jsonl"), device="cpu")
    want = json.loads((tmp_path / "s2.jsonl").read_text())
    assert got["rejected_tokens"] == want["rejected_tokens"]
    assert got["rejected_logp"] == pytest.approx(want["rejected_logp"], abs=1e-4)
    assert got["chosen_logp"] == pytest.approx(want["chosen_logp"], abs=1e-4)
