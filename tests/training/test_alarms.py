"""Health alarms: each provoked by a synthetic metrics sequence (raised once, at the right step, the
message naming the numbers) and quiet on a healthy one; then fed the metrics.jsonl of real runs on
the tiny model: a healthy DPO run, one that cannot learn (lr 1e-9), one that memorises 8 pairs."""
import json
import math
import random

import pytest

from directpo.toy import review_task, write_jsonl
from directpo.training import TrainConfig, train
from directpo.training.alarms import ALARMS, Alert, HealthMonitor

LN2 = math.log(2)


def noise(seed: int = 0, scale: float = 0.01):
    rng = random.Random(seed)
    return lambda: rng.uniform(-scale, scale)


def dpo_record(step, chosen, rejected, loss=0.5, acc=0.8, grad=1.0, **kw):
    return {"split": "train", "step": step, "loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected, "rewards/accuracies": acc, "logps/chosen": -30.0,
            "logps/rejected": -32.0, "nll/token": 2.0, "grad_norm": grad, "lr": 1e-6, **kw}


def eval_record(step, loss, acc):
    return {"split": "eval", "step": step, "loss": loss, "rewards/accuracies": acc, "rewards/chosen": 0.0,
            "rewards/rejected": 0.0, "rewards/margins": 0.0}


def fired(monitor, records):
    return [(a.name, a.step) for a in monitor.replay(records)]


def healthy_dpo(steps=60, seed=0):
    """Chosen up, rejected down, loss down, accuracy ~0.8, grad norms ~1, all with noise."""
    n = noise(seed, 0.02)
    return [dpo_record(s, 0.01 * s + n(), -0.02 * s + n(), loss=0.69 - 0.004 * s + n(), acc=0.75 + 5 * n(),
                       grad=1.0 + 10 * n()) for s in range(1, steps + 1)]


def test_a_healthy_sequence_is_quiet():
    recs = healthy_dpo()
    evals = [eval_record(s, 0.69 - 0.003 * s, 0.6 + 0.003 * s) for s in range(0, 61, 10)]
    m = HealthMonitor("dpo")
    assert fired(m, sorted(recs + evals, key=lambda r: (r["step"], r["split"] == "eval"))) == []
    assert m.raised == []


# -- both rewards falling ------------------------------------------------------------------------

def falling_chosen(steps=50):
    """Margin grows 0.05/step throughout; chosen flat at 0.1 (±0.01) to step 30, then falls 0.05/step."""
    out = []
    for s in range(1, steps + 1):
        chosen = 0.1 + (0.01 if s % 2 else -0.01) - 0.05 * max(0, s - 30)
        out.append(dpo_record(s, chosen, chosen - 0.05 * s))
    return out


def test_both_rewards_falling():
    m = HealthMonitor("dpo")
    alerts = m.replay(falling_chosen())
    # the first step whose newer half-window (steps 27-36) has a negative mean chosen reward
    assert [(a.name, a.step) for a in alerts] == [("both_rewards_falling", 36)]
    msg = alerts[0].message
    assert "0.1 → -0.005" in msg and "steps 17–26 → 27–36" in msg and "--sft-weight" in msg and "--beta" in msg
    assert "\n" not in msg


def test_both_rewards_falling_quiet_cases():
    # chosen negative but flat (noise only) while the margin grows: no trend, no alarm
    n = noise(1, 0.05)
    flat = [dpo_record(s, -0.2 + n(), -0.2 - 0.05 * s) for s in range(1, 61)]
    assert fired(HealthMonitor("dpo"), flat) == []
    # chosen falls, but by a sliver of the margin's gain (< chosen_drop_share)
    sliver = [dpo_record(s, -0.001 * s, -0.001 * s - 0.1 * s) for s in range(1, 61)]
    assert fired(HealthMonitor("dpo"), sliver) == []
    assert fired(HealthMonitor("dpo", chosen_drop_share=0.0), sliver) == [("both_rewards_falling", 20)]
    # a reward model's rewards are not implicit rewards: never this alarm
    assert fired(HealthMonitor("rm"), falling_chosen()) == []


# -- overfitting ---------------------------------------------------------------------------------

def memorising(steps=40):
    return [dpo_record(s, 0.1 * s, -0.1 * s, loss=0.01, acc=1.0, grad=0.5 + 0.01 * (s % 3)) for s in range(1, steps + 1)]


def interleave(train_recs, evals):
    return sorted(train_recs + evals, key=lambda r: (r["step"], r["split"] == "eval"))


def test_overfitting_on_rising_eval_loss():
    evals = [eval_record(0, LN2, 0.0), eval_record(10, 0.50, 0.7), eval_record(20, 0.55, 0.7),
             eval_record(30, 0.61, 0.7), eval_record(40, 0.70, 0.7)]
    alerts = HealthMonitor("dpo").replay(interleave(memorising(), evals))
    assert [(a.name, a.step) for a in alerts] == [("overfitting", 30)]  # the second rise in a row
    msg = alerts[0].message
    assert "train accuracy 1.00" in msg and "0.5 → 0.55 → 0.61" in msg and "lowest, 0.5, at step 10" in msg


def test_overfitting_on_stalled_eval_accuracy():
    evals = [eval_record(0, LN2, 0.0), eval_record(10, 0.50, 0.80), eval_record(20, 0.49, 0.78),
             eval_record(30, 0.48, 0.80), eval_record(40, 0.47, 0.79)]
    alerts = HealthMonitor("dpo").replay(interleave(memorising(), evals))
    assert [(a.name, a.step) for a in alerts] == [("overfitting", 30)]
    assert "0.780 → 0.800; best 0.800 at step 10" in alerts[0].message


def test_no_overfitting_alarm_at_the_accuracy_ceiling():
    """Every held-out pair ranked right at each evaluation while the held-out loss keeps falling:
    accuracy cannot improve on 1, and nothing is memorised at the held-out pairs' expense."""
    perfect = [eval_record(0, LN2, 0.0)] + [eval_record(s, 0.5 - 0.01 * s, 1.0) for s in range(10, 41, 10)]
    assert fired(HealthMonitor("dpo"), interleave(memorising(), perfect)) == []
    # the loss rising there is still overfitting
    rising = [eval_record(0, LN2, 0.0)] + [eval_record(s, 0.2 + 0.01 * s, 1.0) for s in range(10, 41, 10)]
    assert fired(HealthMonitor("dpo"), interleave(memorising(), rising)) == [("overfitting", 30)]


def test_overfitting_quiet_cases():
    improving = [eval_record(s, 0.69 - 0.005 * s, 0.5 + 0.01 * s) for s in range(0, 41, 10)]
    assert fired(HealthMonitor("dpo"), interleave(memorising(), improving)) == []
    rising = [eval_record(s, 0.5 + 0.01 * s, 0.7) for s in range(0, 41, 10)]
    not_perfect = [dict(r, **{"rewards/accuracies": 0.9}) for r in memorising()]
    assert fired(HealthMonitor("dpo"), interleave(not_perfect, rising)) == []  # train accuracy 0.9 < 0.98
    plateau = [dict(r, **{"rewards/margins": 5.0 + (0.01 if r["step"] % 2 else -0.01)}) for r in memorising()]
    assert fired(HealthMonitor("dpo"), interleave(plateau, rising)) == []  # margins no longer climbing
    # the reward model's "accuracy" key counts too
    rm = [{"split": "train", "step": r["step"], "loss": 0.01, "accuracy": 1.0, "rewards/chosen": r["rewards/chosen"],
           "rewards/rejected": r["rewards/rejected"], "rewards/margins": r["rewards/margins"], "grad_norm": 0.5}
          for r in memorising()]
    rm_evals = [{"split": "eval", "step": s, "loss": 0.5 + 0.01 * s, "accuracy": 0.7} for s in range(0, 41, 10)]
    assert fired(HealthMonitor("rm"), interleave(rm, rm_evals)) == [("overfitting", 20)]


# -- no learning ---------------------------------------------------------------------------------

def test_no_learning():
    n = noise(2, 1e-5)
    stuck = [dpo_record(s, n(), n(), loss=LN2 + n(), acc=0.0) for s in range(1, 61)]
    alerts = HealthMonitor("dpo").replay(stuck)
    assert [(a.name, a.step) for a in alerts] == [("no_learning", 50)]
    assert "after 50 steps the loss is still 0.6931" in alerts[0].message and "--lr" in alerts[0].message
    assert fired(HealthMonitor("dpo", no_learning_steps=10), stuck) == [("no_learning", 10)]
    hinge = [dict(r, loss=1.0) for r in stuck]
    assert fired(HealthMonitor("hinge", no_learning_steps=10), hinge) == [("no_learning", 10)]
    assert fired(HealthMonitor("ipo"), hinge) == []  # no fixed untrained loss: off
    assert fired(HealthMonitor("ipo", chance_loss=1.0), hinge) == [("no_learning", 50)]


def test_no_learning_quiet_when_the_loss_moves():
    slow = [dpo_record(s, 0.0, 0.0, loss=LN2 - 0.0005 * s) for s in range(1, 61)]
    assert fired(HealthMonitor("dpo"), slow) == []
    sft = [{"split": "train", "step": s, "loss": 2.0, "nll/token": 2.0, "grad_norm": 1.0} for s in range(1, 61)]
    assert fired(HealthMonitor("sft"), sft) == []  # SFT: loss/nll only, no alarm applies to a flat loss


# -- instability ---------------------------------------------------------------------------------

def test_grad_spike_and_loss_jump():
    recs = healthy_dpo(70)
    recs[24]["grad_norm"] = 15.0   # step 25
    recs[26]["grad_norm"] = 14.0   # step 27: same episode, latched
    recs[29]["loss"] = 4.0         # step 30 (median ≈ 0.6)
    recs[59]["grad_norm"] = 20.0   # step 60: after ≥ 20 clear steps, re-armed
    alerts = HealthMonitor("dpo").replay(recs)
    assert [(a.name, a.step) for a in alerts] == [("grad_spike", 25), ("loss_jump", 30), ("grad_spike", 60)]
    assert "gradient norm 15 is 15× the median" in alerts[0].message
    assert "loss 4 jumped to" in alerts[1].message and "--lr" in alerts[1].message
    once = HealthMonitor("dpo", rearm_after=None)
    assert [(a.name, a.step) for a in once.replay(recs)] == [("grad_spike", 25), ("loss_jump", 30)]


def test_instability_quiet_cases():
    # a saturated DPO loss wobbling 1e-4 -> 1e-3 is 10× its median but far below min_loss_jump
    tiny = [dpo_record(s, 1.0, -1.0, loss=1e-3 if s == 30 else 1e-4, acc=1.0) for s in range(1, 41)]
    assert fired(HealthMonitor("dpo"), tiny) == []
    # non-finite gradient norms (a PPO step without updates) are skipped, not compared
    ppo = [{"step": s, "reward": 0.1, "kl": 0.1, "grad_norm": float("nan") if s % 7 == 0 else 1.0, "length_mean": 30.0}
           for s in range(1, 41)]
    assert fired(HealthMonitor("ppo"), ppo) == []
    # too little history: a high second step is no spike
    assert fired(HealthMonitor("dpo"), [dpo_record(1, 0, 0, grad=0.1), dpo_record(2, 0, 0, grad=50.0)]) == []


# -- length drift --------------------------------------------------------------------------------

def ppo_record(step, length):
    return {"step": step, "reward": 0.5, "kl": 0.2, "kl_coef": 0.1, "entropy": 2.0, "policy_loss": -0.01,
            "value_loss": 0.1, "length_mean": length, "lr": 1e-5, "grad_norm": 1.0}


def test_length_drift():
    longer = [ppo_record(s, 40.0 + max(0, s - 10)) for s in range(1, 61)]
    alerts = HealthMonitor("ppo").replay(longer)
    # median of the last 20 lengths passes 60 (= 40 + 50 %) at step 40
    assert [(a.name, a.step) for a in alerts] == [("length_drift", 40)]
    assert "from 40.0 (step 1) to 60.5" in alerts[0].message and "+51%" in alerts[0].message
    shorter = [ppo_record(s, 40.0 - 0.5 * max(0, s - 10)) for s in range(1, 81)]
    assert [a.name for a in HealthMonitor("ppo").replay(shorter)] == ["length_drift"]


def test_length_drift_quiet():
    n = noise(3, 10.0)
    assert fired(HealthMonitor("ppo"), [ppo_record(s, 40.0 + n()) for s in range(1, 101)]) == []


# -- the API -------------------------------------------------------------------------------------

def test_alert_and_monitor_api():
    a = Alert("no_learning", 50, "loss 0.6931 ...")
    assert a.to_dict() == {"name": "no_learning", "step": 50, "message": "loss 0.6931 ..."}
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()
    assert str(a) == "health alarm no_learning at step 50: loss 0.6931 ..."
    assert set(ALARMS) == {"both_rewards_falling", "overfitting", "no_learning", "grad_spike", "loss_jump",
                           "length_drift", "dead_gradients"}
    m = HealthMonitor()
    assert m.observe_train({"step": 1}) == [] and m.observe_eval({"split": "eval", "step": 0}) == []
    # annotate: the alerts go onto the record (as the metrics.jsonl line will carry them), quiet ones untouched
    m, records = HealthMonitor("dpo", no_learning_steps=3), [dpo_record(s, 0.0, 0.0, loss=LN2) for s in (1, 2, 3, 4)]
    assert [len(m.annotate(r)) for r in records] == [0, 0, 1, 0]
    assert ["alerts" in r for r in records] == [False, False, True, False]
    assert records[2]["alerts"] == [m.raised[0].to_dict()] and records[2]["alerts"][0]["name"] == "no_learning"
    with pytest.raises(ValueError, match="window"):
        HealthMonitor(window=3)


# -- real runs on the tiny model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    tr, ev = review_task(n_train=48, n_eval=16, seed=3)
    return write_jsonl(tr, d / "train.jsonl"), write_jsonl(ev, d / "eval.jsonl")


def run_dpo(tiny_model, data, eval_data, out, **kw) -> list[dict]:
    cfg = dict(model=str(tiny_model), data=str(data), eval_data=str(eval_data), eval_every=5, output_dir=str(out),
               lr=1e-3, optimizer="adamw", batch_size=8, micro_batch_size=8, max_steps=20, warmup_steps=2,
               progress=False, max_length=64)
    cfg.update(kw)
    train(TrainConfig(**cfg))
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_real_healthy_run_raises_nothing(tiny_model, task, tmp_path, one_thread):
    records = run_dpo(tiny_model, *task, tmp_path / "run")
    assert records[-2]["split"] == "train" and records[-2]["loss"] < 0.6  # it learned
    # with a 20-step window every DPO alarm is checked at least once (at step 20); no-learning from step 10
    assert HealthMonitor("dpo").replay(records) == []
    assert HealthMonitor("dpo", no_learning_steps=10).replay(records) == []


def test_real_run_that_cannot_learn(tiny_model, task, tmp_path, one_thread):
    records = run_dpo(tiny_model, *task, tmp_path / "run", lr=1e-9, max_steps=12, eval_every=0)
    alerts = HealthMonitor("dpo", no_learning_steps=10).replay(records)
    assert [(a.name, a.step) for a in alerts] == [("no_learning", 10)]
    assert "0.6931" in alerts[0].message
    assert HealthMonitor("dpo").replay(records) == []  # by default it waits for 50 steps


def test_real_run_memorising_eight_pairs(tiny_model, tmp_path, one_thread):
    """8 training pairs, lr 5e-3: train accuracy 1 and margins climbing, while the loss on 32
    held-out pairs (other films, other word combinations) rises evaluation after evaluation."""
    tr, ev = review_task(n_train=8, n_eval=32, seed=3)
    data, eval_data = write_jsonl(tr, tmp_path / "train.jsonl"), write_jsonl(ev, tmp_path / "eval.jsonl")
    records = run_dpo(tiny_model, data, eval_data, tmp_path / "run", lr=5e-3, max_steps=30)
    train_recs = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert all(r["rewards/accuracies"] == 1.0 for r in train_recs[-10:])
    assert evals[-1]["loss"] > evals[1]["loss"] > 0 and evals[-1]["loss"] > LN2
    alerts = HealthMonitor("dpo", window=10).replay(records)
    assert [a.name for a in alerts] == ["overfitting"]
    assert alerts[0].step in {e["step"] for e in evals} and "held-out loss rose" in alerts[0].message
