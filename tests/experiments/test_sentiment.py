"""`directpo experiment sentiment --preset smoke`: every stage on a tiny model, resumable, with its report."""
import json
import random

import pytest

from directpo.data.formats import DataError
from directpo.eval.bon import bon_kl
from directpo.experiments import sentiment
from directpo.experiments.sentiment.config import SentimentConfig, preset_defaults
from directpo.experiments.sentiment import corpus as corpus_module
from directpo.experiments.sentiment.corpus import SST_RELATIVE_PATH, default_corpus, read_corpus
from directpo.experiments.sentiment.stages import stage_corpus
from directpo.toy import NEGATIVE, POSITIVE

pytest.importorskip("vaderSentiment")
pytestmark = pytest.mark.usefixtures("one_thread")

NEUTRAL = ["film", "story", "plot", "actors", "director", "movie", "script", "ending", "scenes", "music"]


def review_corpus(path, n=1200, seed=0):
    """Short review-like sentences whose sentiment varies (VADER knows the adjectives)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("sentence_index\tsentence\n")  # SST's layout
        for i in range(n):
            words = [rng.choice(NEUTRAL + POSITIVE + NEGATIVE) for _ in range(rng.randint(6, 12))]
            f.write(f"{i + 1}\tThe {' '.join(words)} -LRB- really -RRB- .\n")
    return path


def test_read_corpus_formats_and_errors(tmp_path):
    texts = read_corpus(str(review_corpus(tmp_path / "c.txt", n=5)))
    assert len(texts) == 5 and texts[0].startswith("The ") and "(really)." in texts[0] and "-LRB-" not in texts[0]
    (tmp_path / "c.jsonl").write_text('{"text": "a fine film"}\n{"review": "no text field"}\n')
    with pytest.raises(DataError) as e:
        read_corpus(str(tmp_path / "c.jsonl"))
    assert "c.jsonl" in str(e.value) and "line 2" in str(e.value) and "text" in str(e.value)  # 1-based, as editors count


def test_smoke_study_end_to_end_and_resumes(tmp_path, monkeypatch):
    corpus = review_corpus(tmp_path / "reviews.txt")
    out = tmp_path / "study"
    argv = ["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus", str(corpus),
            "--no-progress", "--threads", "1"]
    from directpo.cli import main

    # 1. the study is killed in its third method run
    real, calls = sentiment.run_method, []

    def dies(cfg, out_, sft, run, scorer):
        calls.append(run.name)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(cfg, out_, sft, run, scorer)

    monkeypatch.setattr(sentiment, "run_method", dies)
    with pytest.raises(RuntimeError):
        main(argv)
    first = out / "runs" / calls[0] / "model.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sft" / "model.safetensors", first, out / "rm" /
                                                 "model.safetensors")}
    # 2. run again: it continues, redoing none of the finished stages
    monkeypatch.setattr(sentiment, "run_method", real)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    points = json.loads((out / "points.json").read_text())
    assert {p["method"] for p in points} == {"dpo", "ppo", "ppo_gt", "unlikelihood", "preferred_ft", "best_of_n",
                                             "sft"}
    for p in points:
        assert set(p) == {"method", "knob", "step", "kl", "kl_se", "reward", "reward_se", "length", "seed",
                          "reward_lc", "reward_lc_se", "prompt_rewards"}
        # per-prompt mean rewards (what the report's prompt bootstrap resamples): one per eval prompt
        assert len(p["prompt_rewards"]) == 16 and sum(p["prompt_rewards"]) / 16 == pytest.approx(p["reward"])
        assert -1.0 <= p["reward"] <= 1.0 and p["length"] > 0 and p["seed"] == 0
        assert p["reward_lc"] is not None and p["reward_lc_se"] >= 0
    sft_pt = next(p for p in points if p["method"] == "sft")
    assert sft_pt["kl"] == 0.0  # πSFT against itself: every log-ratio is exactly 0
    assert {p["knob"]: p["kl"] for p in points if p["method"] == "best_of_n"} == {2: bon_kl(2), 4: bon_kl(4)}
    dpo = sorted((p["knob"], p["step"]) for p in points if p["method"] == "dpo")
    assert dpo == [(0.1, 2), (0.1, 4), (1.0, 2), (1.0, 4)]  # two checkpoints per run (eval_points 2)
    assert sorted(p["step"] for p in points if p["method"] == "ppo") == [1, 2]  # a PPO snapshot and the end
    # a mid-run checkpoint is a different policy from the final one
    d2, d4 = (next(p for p in points if p["method"] == "dpo" and p["knob"] == 0.1 and p["step"] == s) for s in (2, 4))
    assert d2["kl"] != d4["kl"]

    prompts = {split: [json.loads(x)["prompt"] for x in open(out / "prompts" / f"{split}.jsonl")]
               for split in ("train", "eval")}
    assert not set(prompts["train"]) & set(prompts["eval"])  # disjoint
    from directpo.models import load_tokenizer

    tok = load_tokenizer(str(out / "sft"))
    assert all(2 <= len(tok(p, add_special_tokens=False)["input_ids"]) <= 16 for p in prompts["eval"])  # k tokens, whole words
    pairs = [json.loads(x) for x in open(out / "pairs" / "train.jsonl")]
    assert pairs and all(p["chosen_reward"] - p["rejected_reward"] >= 0.05 for p in pairs)
    assert (out / "frontier.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    for name in ("PPO (learned RM)", "PPO-GT", "Unlikelihood", "Preferred-FT", "Best-of-N"):
        assert name in md
    assert "perplexity" in md
    assert "## Best reward within each KL budget" in md and "## Length-controlled" in md
    sft_pt = next(p for p in points if p["method"] == "sft")
    assert sft_pt["reward_lc"] == pytest.approx(sft_pt["reward"], abs=1e-9)  # at its own mean length: its mean


def test_too_small_corpus_names_the_file(tmp_path):
    corpus = review_corpus(tmp_path / "tiny.txt", n=50)
    cfg = SentimentConfig(output_dir=str(tmp_path / "out"), corpus=str(corpus), **preset_defaults("smoke"))
    with pytest.raises(ValueError, match=r"tiny\.txt: 50 usable texts, too few"):
        stage_corpus(cfg, tmp_path / "out")


def test_default_corpus_is_found_next_to_the_checkout_or_is_an_error(tmp_path, monkeypatch, capsys):
    """No --corpus: the SST sentences above the working directory or above the package, else a clear
    error naming --corpus and where it looked; never a silent download of IMDb from the hub."""
    monkeypatch.setattr(corpus_module, "__file__", str(tmp_path / "site" / "directpo" / "corpus.py"))
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError) as e:
        default_corpus()
    msg = str(e.value)
    assert "--corpus" in msg and str(work) in msg and str(SST_RELATIVE_PATH) in msg and "\n" not in msg
    assert str(tmp_path / "site" / "directpo") in msg
    # the command: exit 2 with that line, before anything is downloaded or trained
    from directpo.cli import main

    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: no corpus: --corpus is not given" in err
    # found above the working directory ...
    sst = tmp_path / "project" / SST_RELATIVE_PATH
    sst.parent.mkdir(parents=True)
    review_corpus(sst, n=5)
    assert default_corpus() == str(sst)
    # ... or above the package
    sst.unlink()
    monkeypatch.setattr(corpus_module, "__file__", str(tmp_path / "project" / "src" / "directpo" / "corpus.py"))
    monkeypatch.chdir(tmp_path)
    sst2 = tmp_path / "project" / "src" / SST_RELATIVE_PATH
    sst2.parent.mkdir(parents=True)
    review_corpus(sst2, n=5)
    assert default_corpus() == str(sst2)


def test_online_dpo_method_against_offline_dpo(tmp_path):
    """`--methods dpo,online_dpo`: online DPO rounds are points of the frontier, measured like every
    other method's, compared with offline DPO at matched KL, with both costs; no reward model is
    trained when no method uses it."""
    from directpo.cli import main

    corpus = review_corpus(tmp_path / "reviews.txt")
    out = tmp_path / "study"
    argv = ["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus", str(corpus),
            "--no-progress", "--threads", "1", "--methods", "dpo,online_dpo", "--dpo-betas", "0.1"]
    assert main(argv) == 0
    points = json.loads((out / "points.json").read_text())
    assert {p["method"] for p in points} == {"sft", "dpo", "online_dpo"}
    online = sorted(p["step"] for p in points if p["method"] == "online_dpo")
    assert online == [1, 2]  # the smoke preset's two rounds, a point each
    assert (out / "runs" / "online_dpo_0.1" / "round-2" / "policy" / "model.safetensors").exists()
    assert not (out / "rm").exists()
    md = (out / "summary.md").read_text()
    assert "## Offline DPO vs online DPO" in md and "| online DPO | " in md and "reward model: not trained" in md
    stamp = (out / "runs" / "online_dpo_0.1" / "round-1" / "policy" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # a finished study redoes nothing
    assert (out / "runs" / "online_dpo_0.1" / "round-1" / "policy" / "model.safetensors").stat().st_mtime_ns == stamp


def test_methods_setting_is_checked(tmp_path):
    cfg = SentimentConfig(output_dir=str(tmp_path), methods="dpo,ppo_typo", **preset_defaults("smoke"))
    with pytest.raises(ValueError, match="--methods: unknown ppo_typo"):
        cfg.validate()


def test_seeds_run_whole_studies_and_report_what_holds_across_them(tmp_path):
    from directpo.cli import main

    corpus = review_corpus(tmp_path / "reviews.txt")
    out = tmp_path / "study"
    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus", str(corpus),
                 "--no-progress", "--threads", "1", "--methods", "dpo,best_of_n", "--dpo-betas", "0.1",
                 "--seeds", "0,1"]) == 0
    points = json.loads((out / "points.json").read_text())
    assert {p["seed"] for p in points} == {0, 1}
    for s in (0, 1):  # each seed a whole study with its own prompts
        assert (out / f"seed-{s}" / "summary.md").exists()
        assert json.loads((out / f"seed-{s}" / "study_config.json").read_text())["seed"] == s
    assert (out / "seed-0" / "prompts" / "eval.jsonl").read_text() != (out / "seed-1" / "prompts" /
                                                                         "eval.jsonl").read_text()
    md = (out / "summary.md").read_text()
    assert "| Best-of-N (learned RM) |" in md and "mean [95 % interval]" in md and "Per KL budget" in md
    assert "length-controlled reward" in md and "What each method was given" in md
    summary = json.loads((out / "summary.json").read_text())
    c = summary["comparisons"]["best_of_n"]
    assert set(c["diff_by_seed"]) == {"0", "1"}
    assert c["interval"]["n"] == 2 and c["interval"]["low"] <= c["interval"]["mean"] <= c["interval"]["high"]
    assert set(summary["length_controlled"]) == set(summary["comparisons"])
    # --report-only rewrites every report from the points on disk, the same, training nothing
    seed_md = (out / "seed-0" / "summary.md").read_text()
    for f in (out / "summary.md", out / "seed-0" / "summary.md"):
        f.unlink()
    runs_before = sorted(p.name for p in (out / "seed-0" / "runs").iterdir())
    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--seeds", "0,1",
                 "--report-only", "--no-progress"]) == 0
    assert (out / "summary.md").read_text() == md and (out / "seed-0" / "summary.md").read_text() == seed_md
    assert sorted(p.name for p in (out / "seed-0" / "runs").iterdir()) == runs_before
    with pytest.raises(ValueError, match="--seeds"):
        SentimentConfig(output_dir=str(out), seeds="0,0", **preset_defaults("smoke")).validate()


def test_dpo_trains_on_until_it_covers_the_baselines_kl_range(tmp_path):
    """Where a baseline reaches further in KL than every DPO run, the furthest DPO run trains on one
    checkpoint interval at a time (to the cap here, as the target is out of reach), each new final
    model a point; the extended run is exactly a longer run; a second call redoes nothing. (The smoke
    preset's PPO barely moves, so the baseline's reach is given here.)"""
    from safetensors.torch import load_file

    from directpo.cli import main
    from directpo.experiments.sentiment.coverage import cover_kl_range
    from directpo.experiments.sentiment.runs import Run, plan_runs, train_preference_run
    from directpo.experiments.sentiment.stages import ground_truth

    corpus = review_corpus(tmp_path / "reviews.txt")
    out = tmp_path / "study"
    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus", str(corpus),
                 "--no-progress", "--threads", "1", "--methods", "dpo", "--dpo-betas", "0.1,1.0"]) == 0
    points = json.loads((out / "points.json").read_text())
    cfg = SentimentConfig(output_dir=str(out), corpus=str(corpus), **{
        **preset_defaults("smoke"), "threads": 1, "progress": False, "methods": "dpo", "dpo_betas": "0.1,1.0",
        "dpo_cover": 1.0, "dpo_max_steps": 8})
    runs, scorer, sft = plan_runs(cfg), ground_truth(cfg), str(out / "sft")
    reach = max(p["kl"] for p in points if p["method"] == "dpo")
    near = {"method": "ppo", "knob": 0.1, "step": 2, "kl": reach / 2, "reward": 0.0}
    assert cover_kl_range(cfg, out, sft, scorer, runs, points + [near]) == []  # covered: nothing trains
    assert not (out / "evals" / "dpo_0.1_6.json").exists() and not (out / "evals" / "dpo_1.0_6.json").exists()

    far_baseline = {**near, "kl": reach + 1000.0}
    new = cover_kl_range(cfg, out, sft, scorer, runs, points + [far_baseline])
    far = max((0.1, 1.0), key=lambda b: next(p["kl"] for p in points if p["method"] == "dpo" and p["knob"] == b
                                             and p["step"] == 4))  # the run whose final point went furthest
    assert [(p["method"], p["knob"], p["step"]) for p in new] == [("dpo", far, 6), ("dpo", far, 8)]  # to the cap
    assert all(p["kl"] > 0 and -1 <= p["reward"] <= 1 for p in new)

    # the extended run (4 steps, then 2 more, then 2 more) is the 8-step run
    fresh = tmp_path / "fresh"
    (fresh / "pairs").mkdir(parents=True)
    (fresh / "pairs" / "train.jsonl").write_text((out / "pairs" / "train.jsonl").read_text())
    train_preference_run(cfg, fresh, sft, Run("dpo", far, 8), save_every=2)
    a = load_file(str(out / "runs" / f"dpo_{far:g}" / "model.safetensors"))
    b = load_file(str(fresh / "runs" / f"dpo_{far:g}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)

    # called again (a resumed study): read back, nothing trains
    stamp = (out / "runs" / f"dpo_{far:g}" / "model.safetensors").stat().st_mtime_ns
    assert cover_kl_range(cfg, out, sft, scorer, runs, points + [far_baseline]) == new
    assert (out / "runs" / f"dpo_{far:g}" / "model.safetensors").stat().st_mtime_ns == stamp


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)


def test_coverage_rule_trains_a_ppo_run_on_until_the_rule_stops_it(tmp_path, monkeypatch):
    """The rule is every method's: a PPO-GT run short of DPO's KL trains on one checkpoint interval at
    a time (resumed from its checkpoint, the same interval), each new final model a point, until the
    rule says stop (here: after one extension, as if DPO's FLOPs were spent)."""
    from directpo.cli import main
    from directpo.experiments.sentiment import coverage
    from directpo.experiments.sentiment.runs import plan_runs
    from directpo.experiments.sentiment.stages import ground_truth

    corpus = review_corpus(tmp_path / "reviews.txt")
    out = tmp_path / "study"
    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus", str(corpus),
                 "--no-progress", "--threads", "1", "--methods", "ppo_gt"]) == 0
    points = json.loads((out / "points.json").read_text())
    cfg = SentimentConfig(output_dir=str(out), corpus=str(corpus), **{
        **preset_defaults("smoke"), "threads": 1, "progress": False, "methods": "ppo_gt", "dpo_cover": 1.0})
    reach = max(p["kl"] for p in points if p["method"] == "ppo_gt")
    far_dpo = {"method": "dpo", "knob": 0.1, "step": 4, "kl": reach + 1000.0, "reward": 0.0}
    answers = iter(["train on", "FLOP budget"])
    monkeypatch.setattr(coverage, "ppo_action", lambda *a: next(answers))
    new = coverage.cover_kl_range(cfg, out, str(out / "sft"), ground_truth(cfg), plan_runs(cfg), points + [far_dpo])
    assert [(p["method"], p["knob"], p["step"]) for p in new] == [("ppo_gt", 0.1, 3)]
    metrics = [json.loads(line) for line in (out / "runs" / "ppo_gt_0.1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "step" in m][-1] == 3 and (out / "evals" / "ppo_gt_0.1_3.json").exists()
    # the rule's own decision on these points: short, and the plateau/FLOP checks are what stop it
    decision = coverage.coverage_decisions(points + [far_dpo], compared=cfg.cover_list())["ppo_gt"]
    assert decision["short"] and decision["target"] == pytest.approx(reach + 1000.0)


def test_smoke_study_with_fixed_length(tmp_path):
    """--fixed-length (#31 item 4): every sample after πSFT is exactly --max-new-tokens long — the
    pairs, Best-of-N and every evaluated point — and the report says so."""
    from directpo.cli import main
    from directpo.experiments.sentiment.config import preset_defaults

    out, L = tmp_path / "study", preset_defaults("smoke")["max_new_tokens"]
    assert main(["experiment", "sentiment", "--preset", "smoke", "--output-dir", str(out), "--corpus",
                 str(review_corpus(tmp_path / "reviews.txt")), "--no-progress", "--threads", "1",
                 "--fixed-length", "--methods", "dpo,ppo_gt,best_of_n"]) == 0
    points = json.loads((out / "points.json").read_text())
    assert {p["method"] for p in points} == {"dpo", "ppo_gt", "best_of_n", "sft"}
    assert all(p["length"] == L for p in points), [(p["method"], p["length"]) for p in points]
    assert f"exactly {L} new tokens (--fixed-length" in (out / "summary.md").read_text()
