"""`--check-seeds`: seeds run apart, each gap checked against the pooled seeds' 95 % prediction interval."""
import json

import pytest

from directpo.experiments.sentiment.config import SentimentConfig, preset_defaults
from directpo.experiments.sentiment.seeds import VIEWS, check_seeds, pool


def _study(out, seed: int, lead: float):
    """A seed's points: πSFT at KL 0; DPO and Best-of-N rising with KL, DPO `lead` above."""
    pts = [{"method": "sft", "kl": 0.0, "kl_se": 0.0, "reward": 0.0, "reward_se": 0.01, "reward_lc": 0.0,
            "reward_lc_se": 0.01}]
    for m, extra in (("dpo", lead), ("best_of_n", 0.0)):
        for k in (0.5, 1.0, 2.0, 4.0):
            r = 0.1 * k + extra
            pts.append({"method": m, "kl": k, "kl_se": 0.01, "reward": r, "reward_se": 0.01, "reward_lc": r - 0.02,
                        "reward_lc_se": 0.01})
    (out / f"seed-{seed}").mkdir(parents=True)
    (out / f"seed-{seed}" / "points.json").write_text(json.dumps(pts))
    return [dict(p, seed=seed) for p in pts]


def test_a_held_out_seed_is_checked_against_the_prediction_interval(tmp_path):
    leads = {0: 0.05, 1: 0.07, 2: 0.06, 3: 0.04, 4: 0.08}
    points = [p for s, lead in leads.items() for p in _study(tmp_path, s, lead)]
    _study(tmp_path, 5, 0.065)  # like the others
    _study(tmp_path, 6, 0.40)  # far outside their spread
    seeds = sorted(leads)
    pooled = {view: pool(points, seeds, view) for view in VIEWS}
    cfg = SentimentConfig(output_dir=str(tmp_path), seeds="0,1,2,3,4", check_seeds="5,6",
                          **preset_defaults("smoke")).validate()
    result = check_seeds(cfg, seeds, pooled)
    inside = {(r["seed"], r["view"]): r["inside"] for r in result["rows"] if r["baseline"] == "best_of_n"}
    assert inside == {(5, "raw"): True, (5, "length_controlled"): True, (6, "raw"): False,
                      (6, "length_controlled"): False}
    iv = pooled["raw"]["best_of_n"]["interval"]
    assert iv["pred_low"] < iv["low"] < iv["high"] < iv["pred_high"]
    md = (tmp_path / "check-seeds.md").read_text()
    assert "| 6 | raw ground-truth reward | Best-of-N (learned RM) |" in md and "**no**" in md
    assert json.loads((tmp_path / "check-seeds.json").read_text())["judged"] == result["judged"] == 4


def test_check_seeds_needs_pooled_seeds_and_a_run_seed(tmp_path):
    base = dict(output_dir=str(tmp_path), **preset_defaults("smoke"))
    with pytest.raises(ValueError, match="--check-seeds needs --seeds"):
        SentimentConfig(check_seeds="5", **base).validate()
    with pytest.raises(ValueError, match="not in --seeds"):
        SentimentConfig(seeds="0,1", check_seeds="1", **base).validate()
    cfg = SentimentConfig(seeds="0,1", check_seeds="7", **base).validate()
    with pytest.raises(ValueError, match=r"seed-7/points.json does not exist; run that seed first: directpo experiment "
                                         r"sentiment --preset smoke --seed 7"):
        check_seeds(cfg, [0, 1], {view: {} for view in VIEWS})
