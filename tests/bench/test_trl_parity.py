"""`directpo score` gives TRL 1.16 DPOTrainer's precomputed reference log-probs, per pair, within 1e-3.

Real HH-RLHF rows, the shared fixture Llama (tiny, vocab 2048), fp32 on the CPU, max_length 512.
TRL gets hh_pairs' explicit prompt/chosen/rejected; directpo gets the raw {chosen, rejected}
transcripts, so its own HH split is part of what is checked. The set mixes ordinary pairs, pairs
whose responses are truncated at max_length, and pairs whose prompt alone is >= max_length (TRL
drops them, directpo skips them as 'prompt_too_long' with --on-invalid skip); rows are aligned by
TRL's `idx` column and directpo's `row` field. The comparison code lives in directpo/bench/trl_parity.py
(which scripts/trl_parity.py runs from the command line).
"""
from __future__ import annotations

import pytest

from conftest import SHARED

from directpo.bench import trl_parity as tp

MAX_LENGTH = 512
TOL = 1e-3


@pytest.mark.trl
def test_score_matches_trl_precomputed_ref_logps(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    try:
        fixture, hh_pairs = tp.shared_modules(SHARED)
    except FileNotFoundError as e:
        pytest.skip(f"shared bench or HH data not found: {e}")

    model_dir = fixture.build(tmp_path / "model", size="tiny", vocab_size=2048)
    tok = AutoTokenizer.from_pretrained(model_dir)
    selected = tp.select_mixed(hh_pairs, tok, MAX_LENGTH, n_plain=16, n_truncated=6, n_prompt_too_long=2)
    raw_rows = [r for r, _ in selected]
    pairs = [p for _, p in selected]
    n_too_long = sum(tp.lengths(tok, p)[0] >= MAX_LENGTH for p in pairs)
    n_trunc = sum(tp.lengths(tok, p)[0] < MAX_LENGTH < tp.lengths(tok, p)[1] for p in pairs)
    assert n_trunc >= 1, "no HH pair long enough to exercise truncation"

    trl = tp.trl_ref_logps(model_dir, pairs, MAX_LENGTH)
    dpo = tp.directpo_logps(model_dir, raw_rows, MAX_LENGTH, tmp_path)
    res = tp.compare(trl, dpo, MAX_LENGTH)

    # Same rows kept, but for the prompts >= max_length: TRL drops them, directpo keeps them with the
    # prompt cut from the left.
    too_long = [i for i, p in enumerate(pairs) if tp.lengths(tok, p)[0] >= MAX_LENGTH]  # row = file index
    assert res["trl_only"] == [] and sorted(res["directpo_only"]) == too_long
    assert res["compared"] == len(pairs) - n_too_long
    assert res["truncated"] == n_trunc
    # Same tokens scored (HH split, prompt/response boundary, EOS, truncation).
    assert res["token_count_mismatches"] == []
    bad = [r for r in res["per_pair"] if r["chosen"] >= TOL or r["rejected"] >= TOL]
    assert not bad, f"pairs differing from TRL by >= {TOL}: {bad} (max {res['max_abs_diff']})"
