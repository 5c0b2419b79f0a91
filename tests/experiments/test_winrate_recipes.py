"""`directpo experiment dialogue|summarize --preset smoke`: every stage on a tiny model, resumable,
with its report; the data stage's split and the single-turn filter on the real HH pairs."""
from __future__ import annotations

import json

import pytest

from conftest import HH_FILE
from directpo.cli import main
from directpo.data.formats import write_jsonl
from directpo.experiments import winrate
from directpo.experiments.winrate.config import DialogueConfig, SummarizeConfig, preset_defaults
from directpo.experiments.winrate.data import human_turns, prepare_data
from directpo.experiments.winrate.synthetic import synthetic_tldr_rows

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_FILES = ("base/model.safetensors", "sft/model.safetensors", "rm/model.safetensors",
               "judge/model.safetensors", "dpo/model.safetensors", "ppo/model.safetensors")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def smoke_argv(task, out, *extra):
    return ["experiment", task, "--preset", "smoke", "--output-dir", str(out), "--no-progress", "--threads", "1",
            *extra]


def check_report(out, temperatures=(0.0, 1.0), bon_ns=(2,)):
    """points.json holds a win rate (with its interval) for every method and temperature; the plot
    and summary exist and name the judge."""
    points = json.loads((out / "points.json").read_text())
    expected = {(m, None, t) for m in ("preferred_ft", "dpo", "ppo") for t in temperatures}
    expected |= {("best_of_n", n, t) for n in bon_ns for t in temperatures if t > 0}
    assert {(p["method"], p["knob"], p["temperature"]) for p in points} == expected
    for p in points:
        assert 0.0 <= p["win_rate"] <= 1.0 and p["judged"] == 8, p
        # the per-prompt outcomes the paired tests compare: one per eval prompt, their mean the win rate
        assert len(p["outcomes"]) == 8 and sum(p["outcomes"]) / 8 == pytest.approx(p["win_rate"])
        lo, hi = p["win_rate_ci"]
        assert lo <= p["win_rate"] <= hi and p["length_mean"] > 0
        assert "local reward model" in p["judge_kind"]
    assert (out / "winrate.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    assert "NOT GPT-4" in md and "## Win rate against the reference" in md and "## Samples" in md
    for label in ("Preferred-FT (πSFT)", "DPO", "PPO (learned RM)", "Best-of-N (N=2)"):
        assert label in md
    summary = json.loads((out / "summary.json").read_text())
    # the judge is its own reward model (judge/), not the one Best-of-N and PPO optimise (rm/); both named
    info = summary["info"]
    assert info["judge"]["judge"].endswith("judge") and info["rm"]["rm"].endswith("rm")
    assert "judge's reward model (`judge/`)" in md and "reward model of Best-of-N and PPO (`rm/`)" in md
    assert "## Paired per-prompt comparisons" in md
    # every two methods at each temperature, and DPO's two temperatures
    same_t = {(r["a"], r["b"]) for r in summary["paired"] if r["temperature"] is not None}
    assert ("dpo@0", "preferred_ft@0") in same_t and ("ppo@1", "preferred_ft@1") in same_t
    assert ("dpo@1", "dpo@0") in {(r["a"], r["b"]) for r in summary["paired"] if r["temperature"] is None}
    assert set(summary["win_rates"]) == {f"{m}{'' if k is None else f'_{k}'}@{t:g}" for m, k, t in expected}
    return points, md


def forbid_work(monkeypatch):
    """Make every trainer, sampler and judge fail if called: a finished study must redo none of them."""
    import directpo.eval.evaluate
    import directpo.eval.judge
    import directpo.eval.sample
    import directpo.rlhf.ppo
    import directpo.rlhf.reward_model
    import directpo.training.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in ((directpo.training.loop, "train"), (directpo.rlhf.reward_model, "train_reward_model"),
                         (directpo.rlhf.ppo, "ppo"), (directpo.eval.evaluate, "evaluate_policy"),
                         (directpo.eval.sample, "draw_samples"), (directpo.eval.judge, "build_judge")):
        monkeypatch.setattr(module, name, refuse)


def test_dialogue_smoke_end_to_end_killed_resumed_and_finished(tmp_path, monkeypatch):
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    out = tmp_path / "dialogue"
    argv = smoke_argv("dialogue", out, "--data", str(HH_FILE))
    # 1. killed at DPO: the data, the base model, πSFT and the reward model are done
    real_dpo = winrate.stage_dpo

    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(winrate, "stage_dpo", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    done = {f: (out / f).stat().st_mtime_ns for f in MODEL_FILES[:4]}
    # 2. run again: it continues from DPO, redoing none of the finished stages
    monkeypatch.setattr(winrate, "stage_dpo", real_dpo)
    assert main(argv) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in done} == done
    points, md = check_report(out)
    assert "Dialogue (Anthropic HH)" in md
    train = {r["prompt"] for r in read_jsonl(out / "data" / "train.jsonl")}
    evals = read_jsonl(out / "data" / "eval.jsonl")
    assert len(evals) == 8 and not train & {r["prompt"] for r in evals}  # held-out prompts are disjoint
    # the judge's own prompts: disjoint from the policies' and the eval prompts, counted in summary.json
    judge = {r["prompt"] for r in read_jsonl(out / "data" / "judge.jsonl")}
    data = json.loads((out / "summary.json").read_text())["info"]["data"]
    assert judge and not judge & train and not judge & {r["prompt"] for r in evals}
    assert (data["judge_prompts"], data["train_prompts"], data["eval_prompts"]) == (len(judge), len(train), 8)
    # 3. a finished study: no trainer, sampler or judge runs again, and the report is rewritten the same
    stamps = {f: (out / f).stat().st_mtime_ns for f in MODEL_FILES}
    forbid_work(monkeypatch)
    assert main(argv) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in MODEL_FILES} == stamps
    assert json.loads((out / "points.json").read_text()) == points


def test_summarize_smoke_on_a_tldr_comparisons_file(tmp_path):
    rows = synthetic_tldr_rows(230, seed=1)
    rows.insert(5, {"info": {"article": "a CNN/DM row", "title": "t", "post": None}, "summaries": rows[0]["summaries"],
                    "choice": 0})  # as in the real validation split: skipped and counted with --on-invalid skip
    data = write_jsonl(rows, tmp_path / "comparisons.jsonl")
    out = tmp_path / "summarize"
    assert main(smoke_argv("summarize", out, "--data", str(data), "--on-invalid", "skip")) == 0
    _, md = check_report(out)
    assert "Summarization (Reddit TL;DR)" in md and "1 skipped" in md
    assert "SYNTHETIC DATA" not in md  # real-format data given: the recipe generated nothing
    evals = read_jsonl(out / "data" / "eval.jsonl")
    assert all(r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("\nTL;DR:") for r in evals)


def test_summarize_smoke_without_data_generates_labelled_synthetic_rows(tmp_path):
    cfg = SummarizeConfig(output_dir=str(tmp_path), **preset_defaults(SummarizeConfig, "smoke"))
    info = prepare_data(cfg, tmp_path / "data")
    assert info["synthetic"] and info["source"].endswith("synthetic_tldr.jsonl")
    # the 200 rows read less 8 eval prompts, split by prompt between the policies and the judge
    assert info["eval_prompts"] == 8 and info["train_pairs"] + info["judge_pairs"] == 192
    assert info["judge_pairs"] == 96  # --judge-fraction 0.5 of 192 single-row prompts


def test_single_turn_split_on_real_hh_pairs(tmp_path):
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    cfg = DialogueConfig(output_dir=str(tmp_path), data=str(HH_FILE), single_turn=True, n_eval_prompts=64,
                         judge_fraction=0.0)  # no judge split: every non-eval row trains the policies
    info = prepare_data(cfg, tmp_path / "data")
    assert (info["rows_read"], info["pairs"]) == (2312, 662)  # the file's single-turn subset
    train, evals = read_jsonl(tmp_path / "data" / "train.jsonl"), read_jsonl(tmp_path / "data" / "eval.jsonl")
    # every row of an eval prompt leaves training (the file repeats two prompts: 64–66 rows go)
    assert len(evals) == 64 and 662 - 66 <= len(train) <= 662 - 64
    assert all(human_turns(r["prompt"]) == 1 for r in train + evals)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    # the from-scratch model's text: every transcript of the file (multi-turn too) but the eval prompts'
    texts = [r["completion"] for r in read_jsonl(tmp_path / "data" / "pretrain.jsonl")]
    assert len(texts) > 2 * len(train)
    assert not any(t.startswith(e["prompt"].removesuffix("\n\nAssistant:")) for t in texts for e in evals[:8])


def test_cpu_small_sizes_on_the_real_hh_file(tmp_path):
    """cpu-small: 512 eval prompts (multi-turn ones included), the other rows split by prompt between
    the judge and the policies, no prompt on two sides."""
    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    cfg = DialogueConfig(output_dir=str(tmp_path), data=str(HH_FILE), **preset_defaults(DialogueConfig, "cpu-small"))
    info = prepare_data(cfg.validate(), tmp_path / "data")
    assert not info["single_turn"] and (info["rows_read"], info["pairs"]) == (2312, 2312)
    assert info["eval_prompts"] == 512 and cfg.ppo_steps > 0
    assert info["train_pairs"] + info["judge_pairs"] + 512 in (2312, 2311, 2310)  # two prompts have two rows
    assert abs(info["judge_prompts"] - info["train_prompts"]) <= 1  # --judge-fraction 0.5
    sides = {name: {json.dumps(r["prompt"]) for r in read_jsonl(tmp_path / "data" / f"{name}.jsonl")}
             for name in ("train", "judge", "eval")}
    assert len(sides["eval"]) == 512 and len(sides["judge"]) == info["judge_prompts"]
    assert not (sides["train"] & sides["judge"] or sides["train"] & sides["eval"] or sides["judge"] & sides["eval"])
    assert any(human_turns(json.loads(k)) > 1 for k in sides["eval"])


@pytest.mark.parametrize("argv, message", [
    (["experiment", "summarize", "--output-dir", "o"], "--preset: choose one of smoke, paper"),
    (["experiment", "dialogue", "--preset", "smoke", "--output-dir", "o", "--judge-url", "http://x/v1"],
     "--judge-url needs --judge-model"),
    (["experiment", "dialogue", "--preset", "smoke", "--output-dir", "o", "--temperatures", "0,hot"],
     "--temperatures: expected comma-separated numbers"),
])
def test_setting_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("cls", [DialogueConfig, SummarizeConfig])
def test_every_preset_is_a_valid_study(cls):
    for name in cls.PRESETS:
        cfg = cls(output_dir="o", **preset_defaults(cls, name)).validate()
        assert cfg.temperature_list() and cfg.batch_size % cfg.micro_batch_size == 0
    paper = cls(output_dir="o", **preset_defaults(cls, "paper"))
    assert paper.optimizer == "rmsprop" and paper.batch_size == 64 and paper.warmup_steps == 150
    assert paper.temperature_list() == [0.0, 0.25, 0.5, 0.75, 1.0] and max(paper.bon_list()) == 128
    assert (paper.base_model, paper.beta) == (("EleutherAI/pythia-2.8b", 0.1) if cls is DialogueConfig else
                                              ("EleutherAI/gpt-j-6b", 0.5))


def test_help_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; from directpo.cli import main\n"
            "for task in ('dialogue', 'summarize'):\n"
            "    try: main(['experiment', task, '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--single-turn" in r.stdout and "--judge-url" in r.stdout, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
