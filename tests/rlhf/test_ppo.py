"""PPO (eq. 3): GAE, clipped losses, the KL controller by hand; a tiny policy learns a callable reward."""
import json
import math

import pytest
import torch

from directpo.cli import main
from directpo.rlhf.config import PPOConfig
from directpo.rlhf.ppo import KLController, gae, ppo, ppo_losses, whiten
from directpo.toy import review_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gae_by_hand():
    # Row 0: 3 tokens; row 1: 2 tokens then padding (its padded slot must not leak into anything).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 0.3, 7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # λ = γ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo), returns = reward-to-go
    assert adv.flatten().tolist() == pytest.approx([0.5, 0.8, 0.9, 1.5, 1.7, 0.0])
    assert ret.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 2.5, 2.0, 0.0])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a1 = d1 + 0.45 * d2
    assert adv[0].tolist() == pytest.approx([d0 + 0.45 * a1, a1, d2])
    w = whiten(adv, mask)
    assert (w * mask).sum().item() == pytest.approx(0.0, abs=1e-6) and w[1, 2].item() == 0.0


def test_clipped_losses():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))  # ratios 1.5, 1.5, 0.5, 1
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    out = ppo_losses(logp, old, torch.zeros(1, 4), torch.zeros(1, 4), adv, torch.zeros(1, 4), mask, 0.2, 0.2)
    # max(−Aρ, −A·clip(ρ)): A>0, ρ=1.5 -> −1.2 (clipped); A<0, ρ=1.5 -> 1.5; A<0, ρ=0.5 -> 0.8 (clipped); ρ=1 -> −2
    assert out["policy_loss"].item() == pytest.approx((-1.2 + 1.5 + 0.8 - 2.0) / 4)
    assert out["clip_frac"].item() == pytest.approx(0.75)
    # value loss: the clipped prediction (old ± 0.2) is further from the return: it counts
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = ppo_losses(old, old, v, torch.zeros(1, 4), adv, torch.tensor([[1.0, 0, 0, 0]]), mask, 0.2, 0.2)
    assert out["value_loss"].item() == pytest.approx(0.5 * (0.8 ** 2) / 4)


def test_adaptive_kl_controller():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)  # KL above target: β grows by at most 20 % × n/horizon
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(3.0, 1000)  # below: shrinks
    assert ctl.value < 0.1 * 1.02
    ctl.update(float("nan"), 1000)  # ignored
    assert math.isfinite(ctl.value)


def count_e(prompt, completion):
    """Reward: how many 'e's the completion has (a dense signal a random tiny policy can climb)."""
    return float(completion.count("e"))


def test_ppo_raises_reward_with_finite_kl(tiny_model, tmp_path):
    rows, _ = review_task(n_train=64, n_eval=1, seed=4)
    prompts = write_jsonl([{"prompt": r["prompt"]} for r in rows], tmp_path / "prompts.jsonl")
    cfg = PPOConfig(model=str(tiny_model), prompts=str(prompts), output_dir=str(tmp_path / "ppo"), lr=5e-3,
                    batch_size=16, mini_batch_size=8, ppo_epochs=2, max_steps=16, max_new_tokens=8, kl_coef=0.05,
                    seed=0, progress=False, log_every=100, snapshot_every=8)
    ppo(cfg, reward=count_e)
    m = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [x["step"] for x in m] == list(range(1, 17))
    for x in m:
        for key in ("reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "policy_loss"):
            assert math.isfinite(x[key]), (key, x)
    first = sum(x["reward"] for x in m[:4]) / 4
    last = sum(x["reward"] for x in m[-4:]) / 4
    assert last > first + 1.0, [x["reward"] for x in m]
    assert m[0]["kl"] == 0.0  # πθ = πref at the first rollout: every log-ratio is exactly 0
    assert m[-1]["kl"] > 0.1  # moved away from πref, and the KL says so
    assert m[-1]["entropy"] < m[0]["entropy"]
    # the saved policy is a plain HF model that generates more 'e's than the start
    from directpo.data.prompts import load_prompts
    from directpo.eval.sample import draw_samples
    from directpo.models import load_model, load_tokenizer

    items = load_prompts(str(prompts))[:16]
    tok = load_tokenizer(str(tiny_model))
    before = draw_samples(load_model(str(tiny_model)), tok, items, n=4, max_new_tokens=8, seed=9)
    after = draw_samples(load_model(str(tmp_path / "ppo")), tok, items, n=4, max_new_tokens=8, seed=9)
    assert sum(map(count_e, before.prompts, after.texts)) > sum(map(count_e, before.prompts, before.texts))
    assert (tmp_path / "ppo" / "value_head.safetensors").exists()
    # --snapshot-every 8: the policy of step 8 as a loadable HF model, between the start and the end
    snaps = sorted(p.name for p in (tmp_path / "ppo" / "snapshots").iterdir())
    assert snaps == ["step-8"]
    mid = draw_samples(load_model(str(tmp_path / "ppo" / "snapshots" / "step-8")), tok, items, n=4, max_new_tokens=8,
                       seed=9)
    assert mid.texts != after.texts and mid.texts != before.texts


def test_ppo_cli_reward_fn_from_cwd(tiny_model, tmp_path, monkeypatch, capsys):
    (tmp_path / "rewards_here.py").write_text("def n_words(prompt, completion):\n    return len(completion.split())\n")
    rows, _ = review_task(n_train=8, n_eval=1, seed=5)
    write_jsonl(rows, tmp_path / "pairs.jsonl")  # a preference file: its prompts are used
    monkeypatch.chdir(tmp_path)
    code = main(["ppo", "--model", str(tiny_model), "--prompts", "pairs.jsonl", "--output-dir", "out",
                 "--reward-fn", "rewards_here:n_words", "--batch-size", "4", "--mini-batch-size", "2",
                 "--ppo-epochs", "1", "--max-steps", "2", "--max-new-tokens", "4", "--adaptive-kl",
                 "--target-kl", "0.5", "--kl-coef", "0.2", "--no-progress"])
    assert code == 0
    m = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(m) == 2 and m[0]["kl_coef"] == 0.2
    assert m[1]["kl_coef"] != 0.2  # the adaptive controller moved β after step 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert main(["ppo", "--model", str(tiny_model), "--prompts", "pairs.jsonl", "--output-dir", "o2",
                 "--max-steps", "1"]) == 2
    assert "exactly one of --reward-model" in capsys.readouterr().err


def test_ppo_killed_mid_checkpoint_resumes_bit_identical(tiny_model, tmp_path):
    """kill -9 while writing checkpoint 3, `--resume`: the final policy and value head, and every
    metrics line but the timings, equal an uninterrupted run's exactly (adaptive β, two PPO epochs:
    the KL coefficient and the mini-batch generator are part of the checkpoint)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from directpo.training.checkpoint import list_checkpoints

    (tmp_path / "rewards_here.py").write_text("def count_e(prompt, completion):\n    return float(completion.count('e'))\n")
    rows, _ = review_task(n_train=12, n_eval=1, seed=6)
    write_jsonl([{"prompt": r["prompt"]} for r in rows], tmp_path / "prompts.jsonl")
    faults = Path(__file__).resolve().parents[1] / "faults" / "inject.py"

    def run(out, *extra, kill=None):
        argv = ["ppo", "--model", str(tiny_model), "--prompts", "prompts.jsonl", "--output-dir", out,
                "--reward-fn", "rewards_here:count_e", "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs",
                "2", "--max-steps", "5", "--max-new-tokens", "6", "--lr", "5e-3", "--adaptive-kl", "--target-kl",
                "0.5", "--save-every", "1", "--threads", "1", "--no-progress", *extra]
        cmd = [sys.executable, "-m", "directpo"] if kill is None else [sys.executable, str(faults),
                                                                        "--kill-during-save", str(kill)]
        p = subprocess.run([*cmd, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stderr[-3000:]

    rc, err = run("full")
    assert rc == 0, err
    rc, _ = run("killed", kill=3)
    assert rc == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000001", "step-00000002"]
    rc, err = run("killed", "--resume")
    assert rc == 0, err
    assert "resumed from" in err and "step 2" in err
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def lines(out):
        skip = {"rollouts_per_s", "elapsed_s"}
        return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in open(tmp_path / out / "metrics.jsonl")]

    assert lines("full") == lines("killed")
    assert len({m["kl_coef"] for m in lines("full")}) > 1  # β did adapt, so restoring it mattered


def test_ppo_refuses_a_prompt_past_the_models_context(tiny_model, tmp_path, monkeypatch, capsys):
    """PPO rolls out as `sample` does: a prompt beyond max_position_embeddings (2048) would be sampled
    into nonsense and trained on; refused in one line naming the row and the flag that cuts it."""
    (tmp_path / "rw.py").write_text("def n_words(prompt, completion):\n    return len(completion.split())\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "short"}) + "\n"
                                      + json.dumps({"prompt": "the film was good " * 700}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["ppo", "--model", str(tiny_model), "--prompts", "p.jsonl", "--output-dir", "out", "--reward-fn",
                 "rw:n_words", "--batch-size", "2", "--mini-batch-size", "2", "--max-steps", "1",
                 "--max-new-tokens", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl, line 2" in err[0] and "--max-prompt-length 2044" in err[0], err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
