"""`directpo bench --vision` (issue #30, item 5): its settings, its arithmetic and table, the deeper
vision tower of the tiny VLM it builds, and one whole run of every configuration on a tiny model."""
from __future__ import annotations

import importlib.util
import json

import pytest

from directpo.bench import vision as vb
from directpo.bench.config import BenchConfig
from directpo.config import ConfigError
from directpo.errors import UserValueError
from directpo.toy import COLOURS, build_tiny_vlm

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8


def test_vision_needs_no_model_or_data_but_the_text_bench_does():
    BenchConfig(vision=True).validate()
    with pytest.raises(ConfigError, match="missing required setting.*--model, --data"):
        BenchConfig().validate()
    with pytest.raises(ConfigError, match="--vision and --sample"):
        BenchConfig(vision=True, sample=True).validate()
    with pytest.raises(ConfigError, match="--image-size"):
        BenchConfig(vision=True, image_size=10).validate()


def test_check_refuses_a_batch_trl_cannot_accumulate_and_an_empty_run():
    with pytest.raises(UserValueError, match="--batch 6 is not a multiple of --micro-batch 4"):
        vb._check(BenchConfig(vision=True, batch=6, micro_batch=4))
    with pytest.raises(UserValueError, match="CPU only, not --device cuda"):
        vb._check(BenchConfig(vision=True, device="cuda"))
    with pytest.raises(UserValueError, match="nothing to run"):
        vb._check(BenchConfig(vision=True, systems="none"))
    assert [c[0] for c in vb._check(BenchConfig(vision=True, systems="directpo"))] == ["directpo", "directpo"]


def test_ratios_and_table_from_medians():
    runs = {"a": [{"pairs_per_s": 3.0, "peak_rss_mib": 400.0, "above_import_mib": 100.0, "trainable_params": 5},
                  {"pairs_per_s": 5.0, "peak_rss_mib": 420.0, "above_import_mib": 120.0, "trainable_params": 5},
                  {"error": "exit status 1"}],
            "t": [{"pairs_per_s": 1.0, "peak_rss_mib": 800.0, "above_import_mib": 200.0, "trainable_params": 5}]}
    results = [vb._summary("a", "directpo", True, runs["a"]), vb._summary("t", "trl", False, runs["t"])]
    assert results[0]["pairs_per_s"] == 4.0 and results[0]["above_import_mib"] == 110.0
    assert (results[0]["rounds_ok"], results[0]["rounds_failed"]) == (2, 1)
    lines = vb.ratios(results)
    assert len(lines) == 1 and "4.00× TRL's pairs/s" in lines[0] and "0.55× TRL's memory" in lines[0]
    result = {"settings": {"model_desc": "m", "pairs": 16, "image_size": 56, "batch": 8, "micro_batch": 8,
                          "steps": 1, "rounds": 3}, "results": results, "ratios": lines}
    table = vb.format_table(result)
    assert "| a | 4.00 | 410 | 110 | 5 | 2/3 |" in table and lines[0] in table


def test_build_tiny_vlm_takes_a_deeper_vision_tower(tmp_path):
    import json as _json

    path = build_tiny_vlm(tmp_path, "qwen2_vl", TEXTS, vision_layers=3, vision_hidden=48, vision_heads=4)
    vision = _json.loads((path / "config.json").read_text())["vision_config"]
    assert (vision["depth"], vision["embed_dim"], vision["num_heads"]) == (3, 48, 4)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (the bench extra)")
def test_vision_bench_runs_every_configuration(tmp_path):
    """Three training processes, 2 steps of 2 pairs each (~25 s on a loaded 2-core machine)."""
    from directpo.cli import main

    model = build_tiny_vlm(tmp_path / "model", "qwen2_vl", TEXTS, seed=0)
    out = tmp_path / "res" / "vision.json"
    rc = main(["bench", "--vision", "--model", str(model), "--steps", "2", "--rounds", "1", "--batch", "2",
               "--image-size", "56", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["system"] for r in res["results"]] == ["directpo", "directpo", "trl"]
    assert [r["precompute_ref"] for r in res["results"]] == [True, False, False]
    for r in res["results"]:
        assert r["rounds_ok"] == 1 and r["pairs_per_s"] > 0 and r["peak_rss_mib"] > r["above_import_mib"] > 0
    # Both systems train the same weights: the language model, the vision side frozen.
    assert len({r["trainable_params"] for r in res["results"]}) == 1
    assert all(run["train_pairs"] == 6 for runs in res["runs"].values() for run in runs)
    assert res["settings"]["pairs"] == 6 and len(res["ratios"]) == 2
    assert out.with_suffix(".md").read_text().startswith("directpo bench --vision")
