"""`directpo experiment dialogue --seeds 0,1`: one whole study per seed (each with its own judge split,
judge, PPO and paired tests) and the pooled report over seeds; `--report-only` rewrites it the same."""
import json
import statistics
from pathlib import Path

import pytest

from conftest import HH_FILE
from directpo.cli import main
from directpo.experiments.winrate.config import DialogueConfig, preset_defaults
from directpo.experiments.winrate.findings import NOT_TESTABLE
from directpo.experiments.winrate.seeds import run_seeds

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def prompts(folder, name):
    return {json.dumps(r["prompt"]) for r in read_jsonl(folder / "data" / f"{name}.jsonl")}


@pytest.mark.slow  # two whole smoke studies (≈ 35 s on a busy 2-core machine); the pooling is tested fast below
def test_dialogue_smoke_two_seeds_pooled(tmp_path):
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    out = tmp_path / "hh"
    argv = ["experiment", "dialogue", "--preset", "smoke", "--output-dir", str(out), "--no-progress", "--threads", "1",
            "--data", str(HH_FILE), "--seeds", "0,1"]
    assert main(argv) == 0
    evals = {}
    for s in (0, 1):
        seed_dir = out / f"seed-{s}"
        summary = json.loads((seed_dir / "summary.json").read_text())
        data = summary["info"]["data"]
        sides = {name: prompts(seed_dir, name) for name in ("train", "judge", "eval")}
        # three disjoint sets of prompts: the judge never sees a policy's or an eval prompt
        assert not (sides["train"] & sides["judge"] or sides["train"] & sides["eval"] or sides["judge"] & sides["eval"])
        assert (len(sides["judge"]), len(sides["eval"])) == (data["judge_prompts"], data["eval_prompts"]) == \
               (data["judge_prompts"], 8) and data["judge_pairs"] > 0 and data["judge_split_seed"] is not None
        assert summary["info"]["ppo"]["steps"] == 2 and (seed_dir / "ppo" / "model.safetensors").exists()
        assert summary["info"]["judge"]["heldout_accuracy"] is not None
        evals[s] = sides["eval"]
    assert evals[0] != evals[1]  # each seed draws its own eval prompts
    pooled = json.loads((out / "summary.json").read_text())
    assert pooled["seeds"] == [0, 1] and len(pooled["findings"]) == 4
    seeds = {s: json.loads((out / f"seed-{s}" / "points.json").read_text()) for s in (0, 1)}
    dpo0 = {s: next(p["win_rate"] for p in ps if p["method"] == "dpo" and p["temperature"] == 0) for s, ps in seeds.items()}
    w = pooled["win_rates_over_seeds"]["dpo@0"]
    assert w["by_seed"] == {"0": dpo0[0], "1": dpo0[1]} and w["interval"]["n"] == 2
    assert w["interval"]["mean"] == pytest.approx(statistics.fmean(dpo0.values()))
    if dpo0[0] != dpo0[1]:
        assert w["interval"]["low"] < w["interval"]["mean"] < w["interval"]["high"]
    pair = next(r for r in pooled["paired"] if (r["a"], r["b"]) == ("dpo@0", "preferred_ft@0"))
    per_seed = [next(r["estimate"] for r in json.loads((out / f"seed-{s}" / "summary.json").read_text())["paired"]
                     if (r["a"], r["b"]) == ("dpo@0", "preferred_ft@0")) for s in (0, 1)]
    assert pair["estimate"] == pytest.approx(statistics.fmean(per_seed)) and pair["n"] == 16
    md = (out / "summary.md").read_text()
    for heading in ("## The judge, per seed", "## Win rate against the reference, per seed and pooled",
                    "## Paired per-prompt comparisons", "## The paper's dialogue findings, here"):
        assert heading in md
    assert (out / "winrate.png").stat().st_size > 10_000
    # the pooled report again from the points on disk: nothing trained, the same numbers
    (out / "summary.json").unlink()
    assert main(["experiment", "dialogue", "--preset", "smoke", "--output-dir", str(out), "--seeds", "0,1",
                 "--report-only"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["win_rates_over_seeds"] == pooled["win_rates_over_seeds"] and again["paired"] == pooled["paired"]


def fake_study(rates: dict, judge_accuracy: float):
    """A stand-in for one seed's study: points whose per-prompt outcomes give `rates` (8 prompts), and
    the summary.json fields the pooled report reads."""
    def run_one(cfg):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        points = []
        for (method, t), wins in rates[cfg.seed].items():
            outcomes = [1.0] * wins + [0.0] * (8 - wins)
            points.append({"method": method, "knob": None, "temperature": t, "win_rate": wins / 8,
                           "win_rate_ci": [max(0, wins / 8 - 0.3), min(1, wins / 8 + 0.3)], "outcomes": outcomes})
        (out / "points.json").write_text(json.dumps(points))
        info = {"data": {"eval_prompts": 8, "train_pairs": 40, "judge_pairs": 40},
                "rm": {"heldout_accuracy": 0.6}, "judge": {"heldout_accuracy": judge_accuracy[cfg.seed]},
                "evaluation": {"reference_length": 20.0}}
        (out / "summary.json").write_text(json.dumps({"info": info, "seconds": 60.0}))
    return run_one


def test_pooled_report_over_seeds(tmp_path):
    rates = {0: {("dpo", 0.0): 6, ("preferred_ft", 0.0): 3}, 1: {("dpo", 0.0): 7, ("preferred_ft", 0.0): 3},
             2: {("dpo", 0.0): 6, ("preferred_ft", 0.0): 2}}
    cfg = DialogueConfig(output_dir=str(tmp_path / "hh"), seeds="0,1,2", temperatures="0",
                         **{k: v for k, v in preset_defaults(DialogueConfig, "smoke").items() if k != "temperatures"})
    result = run_seeds(cfg.validate(), fake_study(rates, {0: 0.7, 1: 0.72, 2: 0.69}))
    w = result["win_rates_over_seeds"]["dpo@0"]
    assert w["by_seed"] == {0: 6 / 8, 1: 7 / 8, 2: 6 / 8} and w["interval"]["mean"] == pytest.approx(19 / 24)
    sd = statistics.stdev([6 / 8, 7 / 8, 6 / 8])
    assert w["interval"]["high"] - 19 / 24 == pytest.approx(4.303 * sd / 3 ** 0.5, rel=1e-3)  # t(2 df) · sd / √3
    (pair,) = result["paired"]
    assert (pair["a"], pair["b"]) == ("dpo@0", "preferred_ft@0")
    assert pair["estimate_by_seed"] == {0: 3 / 8, 1: 4 / 8, 2: 4 / 8} and pair["estimate"] == pytest.approx(11 / 24)
    assert (pair["a_better"], pair["b_better"], pair["n"]) == (11, 0, 24)  # the outcomes are 1s then 0s: nested
    assert pair["low"] > 0  # 11/24 ± 4.303 · 0.072 / √3: above 0
    assert [f["verdict"] for f in result["findings"]][3] == "reproduced"  # DPO above πSFT, paired, over seeds
    md = (tmp_path / "hh" / "summary.md").read_text()
    assert "| DPO | 0 | 0.750 | 0.875 | 0.750 | 0.792 [" in md and "## Paired per-prompt comparisons" in md
    # the seeds disagree (one seed's πSFT ahead): the seed-level interval includes 0, not reproduced
    rates[2] = {("dpo", 0.0): 3, ("preferred_ft", 0.0): 5}
    cfg3 = DialogueConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "mixed")})
    result = run_seeds(cfg3, fake_study(rates, {0: 0.7, 1: 0.72, 2: 0.69}))
    assert result["paired"][0]["low"] < 0 < result["paired"][0]["high"]
    assert result["findings"][3]["verdict"] == "not reproduced"
    # one seed's judge below the floor: the pooled findings are not testable (the report says so)
    cfg2 = DialogueConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "weak"), "judge_floor": 0.65})
    result = run_seeds(cfg2, fake_study(rates, {0: 0.7, 1: 0.6, 2: 0.69}))
    assert {f["verdict"] for f in result["findings"]} == {NOT_TESTABLE}
    assert "BELOW THE FLOOR" in (tmp_path / "weak" / "summary.md").read_text()
