"""Issue #27, item 3: a model that died or exploded is never trained on silently nor saved as a
success; infinite settings are refused before anything loads, each error naming the likely cause."""
import json

import pytest
from conftest import review_pairs, train_argv

from directpo.cli import main
from directpo.training.alarms import HealthMonitor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_pairs(tmp_path_factory.mktemp("dead"))


_train = train_argv


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--beta", "inf"),
                                         ("--max-grad-norm", "inf"), ("--label-smoothing", "-inf")])
def test_non_finite_settings_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    assert main(_train("no/such-model", "nosuch.jsonl", tmp_path / "o", flag, value)) == 2
    line = _error(capsys)
    assert f"{flag} must be a finite number" in line and "learning rate" not in line.split(";")[-1]
    assert not (tmp_path / "o").exists()


def test_a_model_that_died_stops_the_run_and_is_not_saved(tiny_model, data, tmp_path, capsys):
    """lr 1e3 with AdamW kills the tiny model after a step or two: the gradient norm is exactly 0
    from then on. Before: trained on for 29 steps and saved as a success."""
    out = tmp_path / "o"
    rc = main(_train(tiny_model, data, out, "--lr", "1e3", "--optimizer", "adamw", "--max-steps", "30",
                     "--divergence-factor", "0"))
    line = _error(capsys)
    assert rc == 2 and "health alarm dead_gradients" in line and "the model died" in line and "--lr" in line
    assert not (out / "model.safetensors").exists() and not (out / "run_complete.json").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] < 30 and records[-1]["alerts"][0]["name"] == "dead_gradients"
    assert all(r["grad_norm"] == 0 for r in records[-5:])


def test_a_dead_model_trains_on_with_no_stop_on_alarm(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(_train(tiny_model, data, out, "--lr", "1e3", "--optimizer", "adamw", "--max-steps", "12",
                     "--divergence-factor", "0", "--no-stop-on-alarm"))
    assert "dead_gradients" in capsys.readouterr().err
    assert rc == 0 or (out / "metrics.jsonl").read_text().count("\n") == 12


def test_exploded_weights_are_never_saved(tiny_model, data, tmp_path, capsys):
    """lr 1e30, one step: the weights are finite but ~1e30. Before: saved, run_complete.json written."""
    out = tmp_path / "o"
    rc = main(_train(tiny_model, data, out, "--lr", "1e30", "--optimizer", "adamw", "--max-steps", "1"))
    line = _error(capsys)
    assert rc == 2 and line.startswith("directpo train: error: not saving the final model") and "Lower --lr" in line
    assert not (out / "model.safetensors").exists() and not (out / "run_complete.json").exists()


def test_check_weights_before_a_save():
    """The guard every save goes through (checkpoints and final models of train, rm and ppo)."""
    import torch

    from directpo.training.run import BrokenWeightsError, StepDriver

    lin = torch.nn.Linear(4, 4)
    lora_b = torch.nn.Parameter(torch.zeros(4, 2))  # starts at 0: may grow (floor 1)
    opt = torch.optim.SGD([*lin.parameters(), lora_b], lr=0.1)
    driver = StepDriver([*lin.parameters(), lora_b], opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0,
                        hint="Lower --lr (now 0.1)")
    with torch.no_grad():
        lora_b.fill_(50.0)
        lin.weight.mul_(100.0)
    driver.check_weights("the checkpoint of step 3")  # grown, but not broken
    with torch.no_grad():
        lin.weight.mul_(1e5)
    with pytest.raises(BrokenWeightsError, match="not saving the checkpoint of step 3: 1 of 3 trainable weight tensors "
                                                 "grew over 1000× .* Lower --lr"):
        driver.check_weights("the checkpoint of step 3")
    with torch.no_grad():
        lin.bias[0] = float("nan")
    with pytest.raises(BrokenWeightsError, match="1 of 3 trainable weight tensors hold NaN/inf"):
        driver.check_weights("the final model")


def test_dead_gradients_alarm_unit():
    m = HealthMonitor("dpo", dead_steps=3)
    assert [m.observe_train({"step": s, "loss": 0.69, "grad_norm": 0.0}) for s in (1, 2)] == [[], []]
    alerts = m.observe_train({"step": 3, "loss": 0.69, "grad_norm": 0.0})
    assert [a.name for a in alerts] == ["dead_gradients"] and alerts[0].fatal
    m = HealthMonitor("sft", dead_steps=2, vocab_size=500)
    import math

    uniform = {"loss": math.log(500), "nll/token": math.log(500) * (1 + 1e-7), "grad_norm": 1e-3}
    assert m.observe_train({"step": 1, **uniform}) == []
    assert [a.name for a in m.observe_train({"step": 2, **uniform})] == ["dead_gradients"]
    # a random initialisation is near ln V but not at it; a tiny nonzero gradient is alive
    m = HealthMonitor("sft", dead_steps=2, vocab_size=500)
    for s in range(1, 6):
        assert m.observe_train({"step": s, "nll/token": math.log(500) - 0.01, "grad_norm": 1e-9}) == []
