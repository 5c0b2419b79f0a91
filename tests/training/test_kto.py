"""KTO and BCO through the one trainer, on the tiny model: unpaired rows, pairs converted on request,
the clear refusals, KTO's batch-wide reference point, BCO's running mean δ and its exact resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directpo.cli import main
from directpo.toy import review_task, write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows, _ = review_task(n_train=16, n_eval=4, seed=11)
    return write_jsonl(rows, tmp_path_factory.mktemp("kto") / "pairs.jsonl")


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
    """One unpaired row per pair: alternately its chosen (desirable) and rejected (undesirable) review."""
    rows, _ = review_task(n_train=16, n_eval=4, seed=11)
    out = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
           for i, r in enumerate(rows)]
    return write_jsonl(out, tmp_path_factory.mktemp("kto") / "unpaired.jsonl")


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "8", "--warmup-steps", "0",
            "--max-length", "64", "--no-progress", "--threads", "1", *extra]


def _lines(out):
    return [json.loads(x) for x in open(Path(out) / "metrics.jsonl")]


def test_kto_trains_two_steps_on_unpaired_rows(tiny_model, unpaired, tmp_path, one_thread):
    out = tmp_path / "kto"
    assert main(_argv(tiny_model, unpaired, out, "--loss", "kto", "--max-steps", "2")) == 0
    m = _lines(out)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert {"loss", "kl", "rewards/desirable", "rewards/undesirable", "logps/chosen"} <= set(x)
        assert "rewards/accuracies" not in x and "logps/rejected" not in x  # no pairs to be accurate about
        assert x["kl"] >= 0
    # step 1: πθ = πref, so r = 0 and z0 = 0 and every loss is λ·(1 − σ(0)) = 1/2
    assert m[0]["loss"] == pytest.approx(0.5, abs=1e-5) and m[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert m[1]["loss"] != m[0]["loss"]
    cfg = json.loads((out / "directpo_config.json").read_text())
    assert cfg["loss"] == "kto" and cfg["train_examples"] == 16 and cfg["reference_mode"] == "precomputed"
    assert (out / "model.safetensors").exists()


def test_kto_on_pairs_converted_to_unpaired_rows(tiny_model, pairs, tmp_path, one_thread, capsys):
    out = tmp_path / "conv"
    assert main(_argv(tiny_model, pairs, out, "--loss", "kto", "--pairs-to-unpaired", "--max-steps", "2",
                      "--eval-data", str(pairs))) == 0
    cfg = json.loads((out / "directpo_config.json").read_text())
    assert cfg["train_examples"] == 32  # each pair: a desirable and an undesirable row
    m = _lines(out)
    train, ev = [x for x in m if x["split"] == "train"], [x for x in m if x["split"] == "eval"]
    assert len(train) == 2 and len(ev) == 2 and all("kl" in x and "rewards/undesirable" in x for x in ev)
    assert ev[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert "warning: kto" not in capsys.readouterr().err  # as many desirable as undesirable: in the range


def test_kto_warns_outside_the_papers_weight_ratio(tiny_model, unpaired, tmp_path, one_thread, capsys):
    assert main(_argv(tiny_model, unpaired, tmp_path / "w", "--loss", "kto", "--max-steps", "1",
                      "--kto-undesirable-weight", "2")) == 0
    assert "λ_D·n_D / (λ_U·n_U) = 0.5" in capsys.readouterr().err


def test_kto_reference_point_is_the_whole_batchs(tiny_model, unpaired, tmp_path, one_thread):
    """z0 comes from every micro-batch of the step before any loss: splitting the batch into
    micro-batches of 2 gives the same z0 and losses as one micro-batch of 8; and a live reference
    (its mismatched log-probs computed at each step) the same as the precomputed table."""
    runs = {}
    for name, extra in (("one", ["--micro-batch-size", "8"]), ("split", ["--micro-batch-size", "2"]),
                        ("live", ["--micro-batch-size", "4", "--no-precompute-ref"])):
        out = tmp_path / name
        assert main(_argv(tiny_model, unpaired, out, "--loss", "kto", "--max-steps", "3", "--layout", "padded",
                          *extra)) == 0
        runs[name] = _lines(out)
    for other in ("split", "live"):
        for a, b in zip(runs["one"], runs[other]):
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6), other
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), other
    assert runs["one"][2]["kl"] > 0  # after a step the policy has moved: the reference point is in use


@pytest.mark.parametrize("extra, says", [
    (["--loss", "kto"], "field 'label': missing: the 'kto' loss takes unpaired rows"),
    (["--loss", "dpo", "--pairs-to-unpaired"], "--pairs-to-unpaired makes unpaired rows, for --loss kto"),
    (["--loss", "kto", "--sft-weight", "0.5"], "--sft-weight"),
])
def test_kto_refusals_on_pairs(tiny_model, pairs, tmp_path, capsys, extra, says):
    assert main(_argv(tiny_model, pairs, tmp_path / "o", "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert says in err
    if "label" in says:
        assert f"{pairs}, line 1" in err and "--pairs-to-unpaired" in err


@pytest.mark.parametrize("loss", ["dpo", "ipo"])  # (sft imitates the desirable rows: the pipeline test)
def test_unpaired_rows_with_another_loss_are_refused(tiny_model, unpaired, tmp_path, capsys, loss):
    assert main(_argv(tiny_model, unpaired, tmp_path / "o", "--max-steps", "1", "--loss", loss)) == 2
    err = capsys.readouterr().err
    assert f"{unpaired}, line 1, field 'label': an unpaired row" in err and "--loss kto" in err


# ---- BCO: the running mean δ ---------------------------------------------------------------------

def test_bco_pair_trains_with_a_running_mean_of_the_batch_rewards(tiny_model, pairs, tmp_path, one_thread):
    out = tmp_path / "bco"
    assert main(_argv(tiny_model, pairs, out, "--loss", "bco_pair", "--max-steps", "4", "--batch-size", "4",
                      "--micro-batch-size", "2")) == 0
    m = _lines(out)
    assert m[0]["loss"] == pytest.approx(2 * 0.6931471805599453, abs=1e-5)  # πθ = πref, δ = 0: 2·ln 2
    assert m[0]["bco/delta"] == 0.0
    for t in range(1, 4):  # step t + 1 uses the mean of the batch rewards of steps 1..t
        mean = sum(x["bco/batch_reward"] for x in m[:t]) / t
        assert m[t]["bco/delta"] == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert "rewards/accuracies" in m[0] and m[3]["bco/delta"] != 0.0


def test_bco_pair_resumes_bit_identically(tiny_model, pairs, tmp_path, one_thread):
    """2 steps, then resumed to 4, ends exactly as 4 steps in one go: δ is in the checkpoint."""
    args = ["--loss", "bco_pair", "--batch-size", "4", "--micro-batch-size", "2"]
    full = tmp_path / "full"
    assert main(_argv(tiny_model, pairs, full, *args, "--max-steps", "4")) == 0
    out = tmp_path / "resumed"
    assert main(_argv(tiny_model, pairs, out, *args, "--max-steps", "2", "--save-every", "2")) == 0
    extra = torch.load(out / "checkpoints" / "step-00000002" / "extra.pt", weights_only=True)
    assert extra["bco_delta"]["count"] == 2 and extra["bco_delta"]["mean"] != 0.0
    assert main(_argv(tiny_model, pairs, out, *args, "--max-steps", "4", "--resume")) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _lines(full), _lines(out)
    assert [x["step"] for x in lb] == [1, 2, 3, 4]
    for key in ("loss", "bco/delta", "bco/batch_reward"):
        assert [x[key] for x in la] == [x[key] for x in lb], key


def test_pipeline_with_kto_imitates_the_desirable_rows_first(tiny_model, unpaired, pairs, tmp_path, one_thread,
                                                             capsys):
    """The paper's recipe with KTO: Preferred-FT on the desirable completions (unpaired rows), or on the
    chosen ones (pairs converted for KTO), then KTO from that model."""
    out = tmp_path / "pipe"
    argv = ["pipeline", "--model", str(tiny_model), "--data", str(unpaired), "--output-dir", str(out), "--loss", "kto",
            "--lr", "1e-3", "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "8",
            "--warmup-steps", "0", "--max-length", "64", "--max-steps", "1", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "8 undesirable rows (label false) are not imitated; 8 kept" in err
    sft = json.loads((out / "sft" / "directpo_config.json").read_text())
    assert sft["loss"] == "sft" and sft["train_examples"] == 8
    assert json.loads((out / "dpo" / "directpo_config.json").read_text())["loss"] == "kto"
    out2 = tmp_path / "pipe2"
    assert main([*argv[:4], str(pairs), "--output-dir", str(out2), *argv[7:], "--pairs-to-unpaired"]) == 0
    assert json.loads((out2 / "sft" / "directpo_config.json").read_text())["train_examples"] == 16
