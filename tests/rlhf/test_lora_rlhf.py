"""LoRA in `directpo ppo` (policy adapters, the value head whole, πref = adapters disabled) and in
`directpo online` (each round's DPO trains adapters): one copy of the base, resumable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directpo.cli import main
from directpo.toy import review_task, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ppo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-lora")
    (d / "lora_rlhf_rewards.py").write_text("def count_e(prompt, completion):\n    return float(completion.count('e'))\n")
    rows, _ = review_task(n_train=12, n_eval=1, seed=6)
    write_jsonl([{"prompt": r["prompt"]} for r in rows], d / "prompts.jsonl")
    return d


def _unique_numel(*modules) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def test_ppo_lora_holds_one_copy_of_the_base(tiny_model, ppo_dir, monkeypatch):
    """Counted parameters: the LoRA run's policy, πref and value head hold the base once plus the
    adapters and the head; the full run holds it twice. πref's log-probs are the base model's."""
    from directpo.data import TokenizedExample
    from directpo.data.collate import collate_padded
    from directpo.logprobs import token_logps
    from directpo.models import load_model
    from directpo.rlhf.config import PPOConfig
    from directpo.rlhf.ppo import setup_models
    from directpo.training.lora import adapters_disabled

    monkeypatch.syspath_prepend(str(ppo_dir))
    base = load_model(str(tiny_model))
    n_base = sum(p.numel() for p in base.parameters())

    def models(**kw):
        cfg = PPOConfig(model=str(tiny_model), prompts=str(ppo_dir / "prompts.jsonl"), output_dir=str(ppo_dir / "o"),
                        reward_fn="lora_rlhf_rewards:count_e", device="cpu", **kw).validate()
        return setup_models(cfg, None, torch.device("cpu"))

    lora, full = models(lora_r=4), models()
    adapters = sum(p.numel() for p in lora.policy.parameters() if p.requires_grad)
    head = sum(p.numel() for p in lora.value_head.parameters())
    assert 0 < adapters < n_base // 10
    assert _unique_numel(lora.policy, lora.ref, lora.value_head) == n_base + adapters + head
    assert _unique_numel(full.policy, full.ref, full.value_head) == 2 * n_base + head
    with torch.no_grad():  # the adapters moved: πref (adapters disabled) is still the base
        for p in lora.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        batch = collate_padded([TokenizedExample(ids, [ids[3:]]) for ids in lora.prompt_ids[:2]],
                               lora.tokenizer.pad_token_id)
        with adapters_disabled(lora.ref):
            ref = token_logps(lora.ref, batch)
        assert torch.equal(ref, token_logps(base, batch))
        assert not torch.allclose(token_logps(lora.policy, batch), ref, atol=1e-3)


def test_ppo_lora_stopped_and_resumed_ends_bit_identical(tiny_model, ppo_dir, monkeypatch):
    """Stopped after step 2 (its checkpoint written then), resumed: the adapters, the value head and
    every metrics line but the timings equal an uninterrupted LoRA run's exactly (adaptive β, two
    PPO epochs); the saved policy is the adapters, naming their base, the value head beside them."""
    import directpo
    from directpo.training import run as run_mod

    monkeypatch.syspath_prepend(str(ppo_dir))
    settings = dict(model=str(tiny_model), prompts=str(ppo_dir / "prompts.jsonl"), reward_fn="lora_rlhf_rewards:count_e",
                    batch_size=4, mini_batch_size=2, ppo_epochs=2, max_steps=4, max_new_tokens=6, lr=2e-2,
                    adaptive_kl=True, target_kl=0.5, threads=1, progress=False, lora_r=4)
    full, cut = ppo_dir / "full", ppo_dir / "cut"
    directpo.ppo(output_dir=str(full), **settings)
    looks = iter([False, True])  # Ctrl-C seen after step 2
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        directpo.ppo(output_dir=str(cut), **settings)
    directpo.ppo(output_dir=str(cut), resume="latest", **settings)
    assert not (full / "model.safetensors").exists()
    config = json.loads((full / "adapter_config.json").read_text())
    assert config["r"] == 4 and Path(config["base_model_name_or_path"]) == Path(tiny_model).resolve()
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    adapters = load_file(str(full / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # it trained

    def lines(out):
        skip = {"rollouts_per_s", "elapsed_s"}
        return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in open(out / "metrics.jsonl")]

    assert lines(full) == lines(cut) and len(lines(full)) == 4
    assert any(m["kl"] != 0 for m in lines(full))  # the policy left πref (the base)


class Killed(Exception):
    """Stands for a kill -9: the run stops where it is, nothing more is written."""


def test_online_lora_rounds_train_adapters_and_resume_after_a_kill(tiny_model, ppo_dir, monkeypatch):
    """Two rounds with lora_r: each round trains adapters (its trainable parameters are the
    adapters') and saves its policy merged, the next round's start; a run dying after round 2's
    first step (no checkpoint yet), then rerun, ends with the policies and rounds of an
    uninterrupted run."""
    import directpo
    from directpo.training import loop
    from directpo.training import run as run_mod

    monkeypatch.syspath_prepend(str(ppo_dir))
    settings = dict(model=str(tiny_model), prompts=str(ppo_dir / "prompts.jsonl"), reward_fn="lora_rlhf_rewards:count_e",
                    samples_per_prompt=4, lr=1e-2, optimizer="adamw", batch_size=8, micro_batch_size=8,
                    epochs_per_round=2, max_new_tokens=6, eval_samples=1, max_length=64, device="cpu", threads=1,
                    progress=False, lora_r=4, rounds=2)
    full, killed = ppo_dir / "online-full", ppo_dir / "online-killed"
    directpo.online(output_dir=str(full), **settings)
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    n_base = sum(v.numel() for v in base.values())
    policies = []
    for r in (1, 2):
        run = json.loads((full / f"round-{r}" / "policy" / "directpo_config.json").read_text())
        assert run["lora_r"] == 4 and run["merge"] and 0 < run["trainable_params"] < n_base // 10
        policies.append(load_file(str(full / f"round-{r}" / "policy" / "model.safetensors")))
        assert policies[-1].keys() == base.keys()  # merged: a whole model, loadable as the next start
    assert not all(torch.equal(policies[0][k], policies[1][k]) for k in base)  # round 2 moved on from round 1
    assert not all(torch.equal(policies[0][k], base[k]) for k in base)

    real_train = loop.train

    def dying_train(cfg, *args, **kwargs):
        if "round-2" in cfg.output_dir:  # dies after its first step, before any checkpoint
            def killed(self, dist=None):
                raise Killed

            monkeypatch.setattr(run_mod.StopRequest, "requested", killed)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", dying_train)
    with pytest.raises(Killed):
        directpo.online(output_dir=str(killed), **settings)
    assert (killed / "round-2" / "policy" / "metrics.jsonl").read_text().count("\n") == 1
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(ppo_dir))
    directpo.online(output_dir=str(killed), **settings)
    for r in (1, 2):
        a = load_file(str(full / f"round-{r}" / "policy" / "model.safetensors"))
        b = load_file(str(killed / f"round-{r}" / "policy" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), r

    def rounds(out):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in open(out / "rounds.jsonl")]

    assert rounds(full) == rounds(killed) and len(rounds(full)) == 3


@pytest.mark.parametrize("command", ["ppo", "online"])
def test_lora_flags_in_help_yaml_and_bad_values(command, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert all(f in shown for f in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"))
    need = ["--model", "m", "--prompts", "p.jsonl", "--output-dir", str(tmp_path / "o"), "--reward-fn", "a:b"]
    assert main([command, *need, "--lora-dropout", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--lora-dropout" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "c.yaml").write_text("lora_r: -2\n")
    assert main([command, *need, "--config", str(tmp_path / "c.yaml")]) == 2
    assert "--lora-r must be ≥ 0" in capsys.readouterr().err  # read from the YAML key lora_r


def test_online_lora_with_the_sft_reference(tiny_model, ppo_dir, monkeypatch):
    """--ref initial with LoRA: round 1's πref is its own network with adapters disabled (the SFT
    model), round 2's the SFT model loaded beside the merged round-1 policy (precomputed)."""
    import directpo

    monkeypatch.syspath_prepend(str(ppo_dir))
    out = ppo_dir / "online-initial"
    directpo.online(model=str(tiny_model), prompts=str(ppo_dir / "prompts.jsonl"), reward_fn="lora_rlhf_rewards:count_e",
                    output_dir=str(out), samples_per_prompt=4, lr=1e-2, optimizer="adamw", batch_size=8,
                    micro_batch_size=8, max_new_tokens=6, eval_samples=1, max_length=64, device="cpu", threads=1,
                    progress=False, lora_r=4, rounds=2, ref="initial")
    runs = [json.loads((out / f"round-{r}" / "policy" / "directpo_config.json").read_text()) for r in (1, 2)]
    assert runs[0]["model"] == runs[0]["reference"] == str(tiny_model)
    assert runs[1]["model"] == str(out / "round-1" / "policy") and runs[1]["reference"] == str(tiny_model)
    assert all(r["lora_r"] == 4 and r["reference_mode"] == "precomputed" for r in runs)
    lines = [json.loads(x) for x in open(out / "rounds.jsonl")]
    assert [x["round"] for x in lines] == [0, 1, 2] and lines[2]["kl"] != lines[1]["kl"]
