"""Sharded checkpoints (torch.distributed.checkpoint) and the FSDP knobs of issue #17.

In-process tests: the sharded format round-trips in one process, refuses another model's
checkpoint, and activation checkpointing gives the stored path's gradients. Multi-process tests
(torchrun, gloo, 2 CPU processes): a sharded checkpoint resumes on another number of processes
(2 → 1, 1 → 2) where that world size's uninterrupted run ends, a SIGKILL mid-save leaves the
previous checkpoint whole and the resumed run bit-identical, and the knobs leave the trajectory
as it was."""
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_process_group
import torch
from safetensors.torch import load_file

from directpo.config import ConfigError
from directpo.models import enable_activation_checkpointing, load_model
from directpo.toy import review_task, write_jsonl
from directpo.training.checkpoint import (SHARDS, list_checkpoints, load_checkpoint, save_checkpoint,
                                       save_sharded_checkpoint)
from directpo.training.config import TrainConfig
from directpo.training.distributed import Dist
from directpo.training.optim import build_optimizer, warmup_schedule

FAULTS = Path(__file__).resolve().parents[1] / "faults" / "inject.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _stepped(tiny_model, seed=0):
    """The tiny model, its AdamW optimizer and warm-up scheduler after one step on random tokens."""
    torch.manual_seed(seed)
    model = load_model(str(tiny_model))
    opt = build_optimizer(model.parameters(), "adamw", 1e-2, 0.01)
    sched = warmup_schedule(opt, 2)
    _loss(model, torch.randint(0, 500, (2, 12))).backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return model, opt, sched


def test_sharded_format_round_trips_in_one_process(tiny_model, tmp_path, one_thread):
    model, opt, sched = _stepped(tiny_model)
    path = save_sharded_checkpoint(tmp_path, 1, 0, model, opt, sched, {"lr": 1e-2}, Dist())
    assert (path / SHARDS / ".metadata").exists() and not (path / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    fresh, fresh_opt, fresh_sched = _stepped(tiny_model, seed=1)  # other weights and optimizer state
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 1
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], fresh_opt.state[q][k]), k
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert fresh_sched.state_dict() == sched.state_dict()


def test_sharded_checkpoint_of_another_model_is_refused(tiny_model, tmp_path, one_thread):
    model, opt, sched = _stepped(tiny_model)
    path = save_sharded_checkpoint(tmp_path, 1, 0, model, opt, sched, {}, Dist())
    other = load_model(str(tiny_model))
    other.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # a parameter the checkpoint lacks
    with pytest.raises(ValueError, match="lacks 2 trainable tensors.*another model"):
        load_checkpoint(path, other, build_optimizer(other.parameters(), "adamw", 1e-2, 0.01),
                        warmup_schedule(opt, 2))


def test_a_lora_sharded_checkpoint_holds_the_adapters_only(tiny_model, tmp_path, one_thread):
    from directpo.training.lora import apply_lora

    def lora_model(seed):
        torch.manual_seed(seed)
        model = apply_lora(load_model(str(tiny_model)), 4, 16.0, "all-linear", 0.0)
        opt = build_optimizer(model.parameters(), "adamw", 1e-2, 0.0)
        _loss(model, torch.randint(0, 500, (2, 12))).backward()
        opt.step()
        return model, opt, warmup_schedule(opt, 2)

    model, opt, sched = lora_model(0)
    path = save_sharded_checkpoint(tmp_path, 1, 0, model, opt, sched, {}, Dist())
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata
    weights = {k[len("model."):] for k in saved if k.startswith("model.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert weights == trainable and all("lora_" in n for n in weights)
    fresh, fresh_opt, fresh_sched = lora_model(1)
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_full_checkpoint_still_loads_as_before(tiny_model, tmp_path, one_thread):
    model, opt, sched = _stepped(tiny_model)
    path = save_checkpoint(tmp_path, 1, 0, model, opt, sched, {})
    fresh, fresh_opt, fresh_sched = _stepped(tiny_model, seed=1)
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model, one_thread):
    ids = torch.randint(0, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = load_model(str(tiny_model))
        model.train()
        if checkpointed:
            enable_activation_checkpointing(model)
        loss = _loss(model, ids)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = grads
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_activation_checkpointing_recomputes(tiny_model, one_thread):
    """The flag really takes effect: each block's forward runs again in the backward."""
    model = load_model(str(tiny_model))
    model.train()
    enable_activation_checkpointing(model)
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward needs (inside the MLP)
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    _loss(model, torch.randint(0, 500, (1, 8))).backward()
    assert len(calls) == 2


def test_training_with_activation_checkpointing_is_the_same_training(tiny_model, tmp_path, one_thread):
    """Three SGD steps (the update is lr × the gradient, so the weights show the gradients) with and
    without --activation-checkpointing: the first loss bit-identical (the same forward), the rest
    and the weight updates equal up to float rounding (1e-4 of the largest update, as the
    multi-process equality tests). Not bit for bit: under checkpointing directpo's lean SwiGLU
    backward (`directpo.fused`) steps aside for autograd's, the same formulas rounded in another
    order. The padded layout: with the packed one, checkpointing also turns segment-by-segment
    attention off (recomputation would lose the segments)."""
    from directpo.training import train

    rows, _ = review_task(n_train=24, n_eval=1, seed=3)
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    results = []
    for name, ac in (("plain", False), ("ac", True)):
        cfg = TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / name), lr=0.5,
                          optimizer="sgd", batch_size=8, micro_batch_size=4, max_steps=3, warmup_steps=0,
                          max_grad_norm=0, max_length=64, layout="padded", progress=False, ref_cache="off",
                          activation_checkpointing=ac)
        train(cfg)
        results.append(([json.loads(x)["loss"] for x in open(tmp_path / name / "metrics.jsonl")],
                         load_file(str(tmp_path / name / "model.safetensors"))))
    (la, wa), (lb, wb) = results
    assert la[0] == lb[0] and la == pytest.approx(lb, abs=1e-5)
    start = load_file(str(tiny_model / "model.safetensors"))
    update = max((wa[k] - start[k]).abs().max().item() for k in wa)
    assert update > 1e-3  # the steps moved the weights
    assert _max_diff(wa, wb) <= 1e-4 * update


@pytest.mark.parametrize("flags, message", [
    ({"fsdp_cpu_offload": True}, "--fsdp-cpu-offload shapes FSDP sharding: it needs --fsdp"),
    ({"fsdp_reshard_after_forward": False}, "--no-fsdp-reshard-after-forward .*needs --fsdp"),
])
def test_knobs_that_cannot_work_are_refused(flags, message):
    cfg = TrainConfig(output_dir="out", model="m", data="d.jsonl", **flags)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


# ----------------------------------------------------------------------------------------------
# Under torchrun (gloo, 2 CPU processes)


def _train(argv: list[str], nproc: int = 1, kill_during_save: int | None = None) -> tuple[int, str]:
    """`directpo train ARGV` in 1 process, or under torchrun in 2 (through tests/faults/inject.py when
    `kill_during_save=N`: every rank dies right after writing its shards of checkpoint N)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "directpo", "train"]
    elif kill_during_save is None:
        cmd = [*TORCHRUN, "-m", "directpo", "train"]
    else:
        cmd = [*TORCHRUN, str(FAULTS), "--kill-during-save", str(kill_during_save), "train"]
    return run_process_group([*cmd, *argv], env)


class Runs:
    """Runs of the same 6 AdamW steps (checkpoints every 2, sharded format) in one directory each."""

    def __init__(self, tiny_model, root: Path):
        rows, _ = review_task(n_train=40, n_eval=8, seed=21)
        self.root = root
        self.common = ["--model", str(tiny_model), "--data", str(write_jsonl(rows, root / "d.jsonl")), "--lr", "1e-3",
                       "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "6",
                       "--warmup-steps", "2", "--max-length", "64", "--save-every", "2", "--no-progress",
                       "--threads", "1", "--checkpoint-format", "sharded"]

    def run(self, out: str, *extra: str, nproc: int = 1, kill_during_save: int | None = None) -> tuple[int, str]:
        fsdp = ["--fsdp"] if nproc > 1 else []
        return _train([*self.common, *fsdp, "--output-dir", str(self.root / out), *extra], nproc, kill_during_save)

    def weights(self, out: str) -> dict:
        return load_file(str(self.root / out / "model.safetensors"))

    def checkpoint(self, out: str, step: int) -> Path:
        return self.root / out / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The uninterrupted runs: FSDP over 2 processes ("fsdp2") and 1 process ("one")."""
    r = Runs(tiny_model, tmp_path_factory.mktemp("sharded"))
    for out, nproc in (("fsdp2", 2), ("one", 1)):
        rc, err = r.run(out, nproc=nproc)
        assert rc == 0, err
    return r


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_an_fsdp_run_writes_shards_per_rank_and_a_consolidated_model(runs):
    ck = runs.checkpoint("fsdp2", 2)
    assert sorted(p.name for p in (ck / SHARDS).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ck / "model.safetensors").exists() and not (ck / "optimizer.pt").exists()
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    # the final model is an ordinary Hugging Face directory, whole
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(runs.root / "fsdp2")
    assert _max_diff(runs.weights("fsdp2"), {k: v for k, v in loaded.state_dict().items()}) == 0.0


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs):
    """Saved by 2 processes, resumed by 1; saved by 1, resumed by 2 (FSDP, here with activation
    checkpointing): each ends where the run that wrote the checkpoint ended, up to float
    re-association between world sizes and attention layouts (the AdamW update of a mis-restored
    weight, moment or learning rate would be ~lr = 1e-3 off)."""
    for out, ck, nproc, same_as, extra in [("two-to-one", runs.checkpoint("fsdp2", 2), 1, "fsdp2", []),
                                           ("one-to-two", runs.checkpoint("one", 2), 2, "one",
                                            ["--activation-checkpointing"])]:
        rc, err = runs.run(out, "--resume", str(ck), *extra, nproc=nproc)
        assert rc == 0, err
        assert f"resumed from {ck} at step 2" in err
        assert _max_diff(runs.weights(same_as), runs.weights(out)) < 1e-5, out


def test_kill_mid_sharded_save_leaves_the_previous_checkpoint_and_resume_is_bit_identical(runs):
    """Every rank SIGKILLed right after writing its shards of step 4: no step-4 checkpoint, step 2
    whole. The resumed run changes the FSDP knobs that do not change the arithmetic (CPU offload,
    keeping gathered weights between forward and backward): it still ends bit-identical to the
    uninterrupted run."""
    rc, _ = runs.run("killed", nproc=2, kill_during_save=4)
    assert rc != 0
    assert [p.name for p in list_checkpoints(runs.root / "killed")] == ["step-00000002"]
    rc, err = runs.run("killed", "--resume", "--fsdp-cpu-offload", "--no-fsdp-reshard-after-forward", nproc=2)
    assert rc == 0, err
    assert "resumed from" in err and "step 2" in err
    assert _max_diff(runs.weights("fsdp2"), runs.weights("killed")) == 0.0
    a, b = ([m["loss"] for m in map(json.loads, open(runs.root / r / "metrics.jsonl"))] for r in ("fsdp2", "killed"))
    assert a == b
