"""Image preference pairs: directpo's reference log-probs equal TRL 1.16 DPOTrainer's, per pair, within
1e-3 (issue #30's acceptance; the 64-pair table is docs/results/vision-parity.md, written by
scripts/vision_parity.py).

TRL refuses `precompute_ref_log_probs=True` on a vision dataset; `directpo.bench.vision_parity` runs
TRL's own precompute routine past that guard, in a child process (its docstring says how and why).
Besides directpo (padded and packed layouts), a plain transformers computation written out in the
bench module is checked against TRL too, so a failure says which side moved.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from directpo.bench import vision_parity as vp
from directpo.toy import COLOURS, build_tiny_vlm, colour_image_task

N = 8
TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8
# Rows 4-7 are changed so a batch mixes prompt lengths (Qwen2-VL keeps each image's aspect, so its
# image-token count varies) and response lengths: TRL's left padding + flush and directpo's packing
# are then exercised, not only identical rows.
SIZES = [(90, 40), (30, 70), (84, 56), (40, 40)]
ANSWERS = [("It is {c}, mostly {c}.", "No."), ("{c}", "It is {w}, I am quite sure of it."),
           ("It is {c}.", "It is {w}."), ("Mostly {c}, with a few other pixels.", "{w}")]


def mixed_colour_pairs(directory) -> tuple:
    train, _ = colour_image_task(directory, n_train=N, n_eval=1, seed=5)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for k, row in enumerate(rows[4:]):
        path = train.parent / row["images"][0]
        Image.open(path).convert("RGB").resize(SIZES[k]).save(path)
        colour = next(c for c in COLOURS if c in row["chosen"][0]["content"])
        wrong = next(c for c in COLOURS if c in row["rejected"][0]["content"])
        chosen, rejected = ANSWERS[k]
        row["chosen"][0]["content"] = chosen.format(c=colour)
        row["rejected"][0]["content"] = rejected.format(w=wrong)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train


def test_compare_finds_the_pair_over_tolerance():
    a = torch.tensor([[-10.0, -12.0], [-9.0, -11.0], [-8.0, -7.0]], dtype=torch.float64)
    b = a.clone()
    b[1, 1] += 5e-3
    res = vp.compare(a, b)
    assert res["over_tol"] == 1 and res["worst_pair"] == 1
    assert res["max_abs_diff"] == pytest.approx(5e-3) and res["median_abs_diff"] == 0.0
    assert vp.compare(a, a)["over_tol"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        vp.compare(a, a[:2])


def test_report_is_markdown_and_json(tmp_path):
    a = torch.tensor([[-10.0, -12.0], [-9.0, -11.0]], dtype=torch.float64)
    row = {"model": "tiny qwen2_vl", "side": "directpo_logps", "response_tokens": [6], **vp.compare(a, a + 1e-6)}
    vp.write_report([row], tmp_path / "vp.md", header="# Vision parity", note="fp32, CPU")
    md = (tmp_path / "vp.md").read_text()
    assert md.startswith("# Vision parity") and "| tiny qwen2_vl | 2 | `directpo_logps` | 6 | 1.00e-06 |" in md
    assert json.loads((tmp_path / "vp.json").read_text())[0]["pairs"] == 2


@pytest.mark.slow
@pytest.mark.trl
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_reference_logps_match_trl(family, tmp_path):
    pytest.importorskip("trl", reason="TRL is the optional bench extra")
    pytest.importorskip("datasets", reason="TRL's data sets")
    model_dir = build_tiny_vlm(tmp_path / "model", family, TEXTS, seed=0)
    data = mixed_colour_pairs(tmp_path / "data")
    trl_logps, info = vp.trl_reference_logps(model_dir, data, N, details=True)
    assert trl_logps.shape == (N, 2) and torch.isfinite(trl_logps).all()
    # The same response tokens scored: TRL's completion mask against directpo's tokenization.
    assert info["tokens"] == vp.directpo_response_tokens(model_dir, data, N)
    assert len({t for pair in info["tokens"] for t in pair}) > 2  # the lengths do vary
    for side in (vp.transformers_logps, vp.directpo_logps, vp.directpo_packed_logps):
        res = vp.parity_table(model_dir, data, N, directpo_logps=side, trl=(trl_logps, info))
        assert res["over_tol"] == 0, f"{side.__name__}: {res['per_pair']} (max {res['max_abs_diff']})"
    # Rows stay in order: the pairs' log-probs are not all alike, so a permutation would show.
    assert trl_logps[:, 0].unique().numel() == N
