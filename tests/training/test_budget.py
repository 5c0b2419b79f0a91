"""--memory-budget escalates (issue #29 item 5): when not even micro-batch 1 fits, activation
checkpointing, then (on CUDA) the optimizer state in host memory, before `MemoryBudgetError`."""
import json
from types import SimpleNamespace

import pytest

from directpo.training import TrainConfig, train
from directpo.training import budget as B

CPU, CUDA = SimpleNamespace(type="cpu"), SimpleNamespace(type="cuda")


def _steps(device, ckpt=False):
    """The plan's ladder for fake costs: 10 bytes a token stored, 2 with activation checkpointing."""
    tokens = lambda m: 100 * m  # noqa: E731
    steps = [(ckpt, False, lambda: (0.0, 2.0 if ckpt else 10.0), tokens)]
    if not ckpt:
        steps.append((True, False, lambda: (0.0, 2.0), tokens))
    if device.type == "cuda":
        steps.append((True, True, lambda: (0.0, 2.0), tokens))
    return steps


def _escalate(budget, device, ckpt=False, keep=None):
    cfg = SimpleNamespace(batch_size=8, activation_checkpointing=ckpt)
    fixed_of = lambda offload: 1000 + (0 if offload else 3000)  # noqa: E731  (3000: the optimizer state)
    return B.escalate(budget, cfg, 1, _steps(device, ckpt), fixed_of, keep, None, device)


def test_the_plan_turns_on_activation_checkpointing_only_when_micro_batch_1_needs_it():
    assert _escalate(10 ** 6, CPU)["escalation"] is None  # fits as it is: nothing turned on
    p = _escalate(4000 + 500, CPU)  # micro-batch 1: 5000 stored, 4200 checkpointed
    assert p["activation_checkpointing"] and not p["optimizer_offload"] and p["micro_batch_size"] == 2
    assert p["escalation"] == ("--memory-budget 4.395 KiB: micro-batch 1 needs 4.883 KiB; with activation "
                               "checkpointing 4.102 KiB: turned on")


def test_on_cuda_the_optimizer_state_moves_to_the_host_next_and_the_cpu_says_it_would_not_help():
    p = _escalate(2000, CUDA)  # checkpointed: 4200; and offloaded: 1200
    assert p["activation_checkpointing"] and p["optimizer_offload"] and p["micro_batch_size"] == 4
    assert "with activation checkpointing and --optimizer-offload 1.172 KiB: turned on" in p["escalation"]
    with pytest.raises(B.MemoryBudgetError) as e:
        _escalate(2000, CPU)
    msg = str(e.value)
    assert "\n" not in msg and "needs at least 4.102 KiB with activation checkpointing (--optimizer-offload " \
                               "would not lower it on the CPU" in msg
    with pytest.raises(B.MemoryBudgetError, match=r"at least 1.172 KiB with activation checkpointing and the "
                                                  r"optimizer state in host memory \(one example"):
        _escalate(1000, CUDA)  # everything on, still too much: the minimum is named


def test_a_resumed_run_keeps_its_own_settings_and_micro_batch():
    p = _escalate(10, CPU, ckpt=True, keep=2)  # over budget, as its checkpoint was made
    assert p["micro_batch_size"] == 2 and not p["fits"] and p["escalation"] is None and p["activation_checkpointing"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from directpo.toy import review_task, write_jsonl

    d = tmp_path_factory.mktemp("task")
    return write_jsonl(review_task(n_train=32, n_eval=4, seed=5)[0], d / "train.jsonl")


def _cfg(tiny_model, task, out, **kw):
    base = dict(model=str(tiny_model), data=str(task), output_dir=str(out), lr=1e-2, optimizer="adamw",
                batch_size=8, micro_batch_size=8, max_steps=3, warmup_steps=0, progress=False, max_length=64,
                precompute_ref=False)
    return TrainConfig(**{**base, **kw})


def _record(run):
    return json.loads((run / "directpo_config.json").read_text())


def test_a_budget_that_fits_only_with_checkpointing_turns_it_on_and_a_resume_keeps_it(tiny_model, task, tmp_path,
                                                                                     monkeypatch, one_thread, capsys):
    """On the tiny model the LM head's 32 MiB chunk outweighs the layers, so checkpointing would
    not help it: its per-token cost is made small here, which the plan (and an explicit
    --activation-checkpointing run, whose cost on the CPU is the same formula) then reads."""
    from directpo.training import run as run_mod

    monkeypatch.setattr(B, "current_memory", lambda device: 0)  # (the process's memory: see test_memory_budget)
    monkeypatch.setattr(B, "checkpointed_cost", lambda cfg, policy, longest: (0.0, 8.0))
    train(_cfg(tiny_model, task, tmp_path / "stored", memory_budget="64GiB", max_steps=1))
    plan = _record(tmp_path / "stored")["memory_plan"]
    stored, fixed = plan["need_by_micro_batch"]["1"], plan["fixed"]
    budget = fixed + 64 * 1024  # 8 bytes a token: every micro-batch fits checkpointed, none stored
    assert stored > budget
    capsys.readouterr()

    train(_cfg(tiny_model, task, tmp_path / "planned", memory_budget=str(budget)))
    assert f"micro-batch 1 needs {B.size_str(stored)}; with activation checkpointing" in capsys.readouterr().err
    rec = _record(tmp_path / "planned")
    assert rec["activation_checkpointing"] and rec["memory_plan"]["turned_on"] == ["activation checkpointing"]
    assert rec["micro_batch_size"] == 8
    train(_cfg(tiny_model, task, tmp_path / "explicit", memory_budget=str(budget), activation_checkpointing=True))

    def metrics(name):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s") and "time" not in k}
                for line in open(tmp_path / name / "metrics.jsonl")]

    assert len(metrics("planned")) == 3 and metrics("planned") == metrics("explicit")

    # stopped after step 2 and resumed: the checkpoint's settings say checkpointing was on, so it stays on
    looks = iter([False, True])
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        train(_cfg(tiny_model, task, tmp_path / "cut", memory_budget=str(budget)))
    capsys.readouterr()
    train(_cfg(tiny_model, task, tmp_path / "cut", memory_budget=str(budget), resume="latest"))
    assert "turned on" not in capsys.readouterr().err  # kept from the checkpoint, not planned again
    assert _record(tmp_path / "cut")["activation_checkpointing"]
    assert metrics("cut")[-1] == metrics("planned")[-1]


def test_a_budget_nothing_fits_names_the_minimum_with_everything_on(tiny_model, task, tmp_path, monkeypatch,
                                                                    one_thread):
    monkeypatch.setattr(B, "current_memory", lambda device: 0)
    with pytest.raises(B.MemoryBudgetError, match=r"needs at least [0-9.]+ \w+ with activation checkpointing "
                                                  r"\(--optimizer-offload would not lower it on the CPU") as e:
        train(_cfg(tiny_model, task, tmp_path / "none", memory_budget="100KiB"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "none" / "metrics.jsonl").exists()
