"""TR-DPO with LoRA: πref is the shared base plus a reference adapter of its own, synced by mixing
the adapters' effective weights exactly (not their factors); a killed run resumes bit-identically."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from directpo.cli import main
from directpo.data import TokenizedExample
from directpo.data.collate import collate_padded
from directpo.logprobs import token_logps
from directpo.models import load_model
from directpo.toy import review_task, write_jsonl
from directpo.training.lora import apply_lora
from directpo.training.lora_reference import LoraReference
from directpo.training.loop import sync_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=16, n_eval=4, seed=5)
    return write_jsonl(rows, tmp_path_factory.mktemp("trdpo-lora") / "d.jsonl")


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--micro-batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--optimizer", "adamw",
            "--warmup-steps", "0", "--no-progress", "--threads", "1", "--lora-r", "4", *extra]


def _merged(policy):
    """The policy's effective weights W0 + s·B·A as a plain model (what full fine-tuning would hold)."""
    return copy.deepcopy(policy).merge_and_unload()


def test_reference_adapter_equals_the_mixed_effective_weights(tiny_model, tiny_tokenizer):
    """Soft and hard syncs of a LoRA reference against full fine-tuning's `sync_reference` on the
    merged weights, from the same start: the same log-probs (fp32), through the low-rank and the
    dense representation of Δref."""
    torch.manual_seed(0)
    base = load_model(str(tiny_model), torch.device("cpu"))
    policy = apply_lora(copy.deepcopy(base), 4, 8.0, "all-linear")
    lora_ref = LoraReference(policy)
    assert lora_ref.rank() == 0  # fresh adapters (B = 0): πref = the base
    full_ref = _merged(policy)
    ids = tiny_tokenizer("a fine film with a dull end", add_special_tokens=False)["input_ids"]
    batch = collate_padded([TokenizedExample(ids[:3], [ids[3:]]), TokenizedExample(ids[:2], [ids[2:]])],
                           tiny_tokenizer.pad_token_id)
    adapters = [p for n, p in policy.named_parameters() if p.requires_grad]
    for i, mix in enumerate([0.5, 0.3, 0.7, 1.0, 0.5, 0.25, 0.5, 0.5, 0.6]):
        with torch.no_grad():  # stands for some optimizer steps of the policy's adapters
            for p in adapters:
                p.add_(torch.randn_like(p) * 1.0)
        lora_ref.sync(mix)
        sync_reference(full_ref, _merged(policy), mix)
        with torch.no_grad(), lora_ref.active():
            got = token_logps(policy, batch)
        want = token_logps(full_ref, batch)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (i, (got - want).abs().max())
        with torch.no_grad():
            # πref is πθ after a hard sync, else neither πθ nor the base
            assert torch.allclose(token_logps(policy, batch), want, atol=1e-3) == (mix == 1)
            assert not torch.allclose(token_logps(base, batch), want, atol=1e-3)
    layers = lora_ref.delta.values()
    assert any("dense" in d for d in layers)  # some layers went dense, others kept growing factors
    assert any("a" in d and d["a"].shape[0] > 4 for d in layers)


def test_lora_trdpo_run_trains_with_a_moving_reference(tiny_model, data, tmp_path):
    """α = 1 every step with LoRA: πref = πθ at the start of each step (loss ln 2 each step), where
    the LoRA run's fixed reference (the base) gives falling losses."""
    out = tmp_path / "o"
    assert main(_argv(tiny_model, data, out, "--max-steps", "4", "--ref-sync-every", "1", "--ref-sync-mix", "1")) == 0
    m = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert all(x["loss"] == pytest.approx(math.log(2), abs=1e-5) for x in m)
    assert json.loads((out / "directpo_config.json").read_text())["reference_mode"].startswith("live, TR-DPO")
    assert (out / "adapter_model.safetensors").exists()  # the saved policy is the adapters alone
    assert not list(out.rglob("reference*"))
    fixed = tmp_path / "fixed"
    assert main(_argv(tiny_model, data, fixed, "--max-steps", "4")) == 0
    assert json.loads((fixed / "metrics.jsonl").read_text().splitlines()[-1])["loss"] < math.log(2) - 1e-3


def test_stopped_lora_trdpo_run_resumes_bit_identical(tiny_model, data, tmp_path, monkeypatch):
    """Stopped after step 3 (between the syncs after steps 2 and 4), resumed: the checkpoint holds
    the reference adapter as synced at step 2, and the run ends with the uninterrupted run's
    adapters and losses exactly."""
    import directpo
    from directpo.training import run as run_mod

    settings = dict(model=str(tiny_model), data=str(data), batch_size=4, micro_batch_size=4, max_steps=6, lr=1e-2,
                    optimizer="adamw", warmup_steps=0, max_length=64, progress=False, threads=1, lora_r=4,
                    ref_sync_every=2, ref_sync_mix=0.5)
    full = directpo.train(output_dir=str(tmp_path / "full"), **settings)
    looks = iter([False, False, True])  # Ctrl-C seen after step 3
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        directpo.train(output_dir=str(tmp_path / "cut"), **settings)
    extra = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000003" / "extra.pt", weights_only=True)
    assert extra["reference_adapter"] and "reference" not in extra  # the adapter, not a model's weights
    assert any(t.abs().sum() > 0 for d in extra["reference_adapter"].values() for t in d.values())
    cut = directpo.train(output_dir=str(tmp_path / "cut"), resume="latest", **settings)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [m["loss"] for m in full.metrics if m.get("split") == "train"]
    assert losses == [m["loss"] for m in cut.metrics if m.get("split") == "train"]
    assert len(set(losses)) > 1


def test_lora_trdpo_refuses_another_reference_model(tiny_model, data, tmp_path, capsys):
    rc = main(_argv(tiny_model, data, tmp_path / "o", "--ref-sync-every", "2", "--ref", str(data.parent)))
    err = capsys.readouterr().err
    assert rc == 2 and "--ref-sync-every with LoRA" in err and "leave --ref out" in err
