"""`StepDriver` (training/step.py), `StopRequest` and `MetricsLog`/`RunDir` resume checks, in
milliseconds: no model, no data files."""
import json
import os
import signal

import pytest
import torch

from directpo.training.rundir import MetricsLog, RunDir
from directpo.training.run import StopRequest
from directpo.training.step import DivergenceError, NonFiniteError, StepDriver, clip_grad_norm


def _driver(params, lr=0.1, **kw):
    opt = torch.optim.SGD(params, lr=lr)
    return StepDriver(params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 0.0, **kw), opt


def _loss_of(w, xs):
    def loss_of(mb):
        losses = torch.stack([(w * xs[i]).sum() ** 2 for i in mb])
        return losses, {"loss": losses.detach().sum().item()}
    return loss_of


def test_accumulation_gives_the_full_batch_mean_whatever_the_split():
    xs = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for split in ([[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3], [4, 5]], [[0], [1, 2, 3, 4], [5]]):
        w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        driver, _ = _driver([w])
        sums = driver.accumulate(split, _loss_of(w, xs), batch_size=6)
        grads.append(w.grad.clone())
        assert sums["loss"] == pytest.approx(sum(((xs[i]).sum() ** 2).item() for i in range(6)))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12) and torch.allclose(grads[0], grads[2], rtol=1e-12)


def test_a_non_finite_loss_never_reaches_the_weights():
    w = torch.nn.Parameter(torch.ones(2))
    driver, _ = _driver([w])
    w.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 1.*learning rate is not the cause"):
        driver.step({"loss": 1.0}, lambda: "at step 1")
    assert torch.equal(w.detach(), torch.ones(2)) and w.grad is None
    skipping, _ = _driver([w], skip_nonfinite=True)
    w.grad = torch.ones(2)
    assert skipping.step({"loss": float("inf")}, lambda: "at step 2")[1] is None and skipping.skipped == 1
    assert torch.equal(w.detach(), torch.ones(2))


def test_divergence_stops_before_the_update():
    w = torch.nn.Parameter(torch.ones(2))
    driver, _ = _driver([w], divergence_factor=10.0, hint="Lower --lr (now 0.1)")
    w.grad = torch.ones(2)
    driver.step({"loss": 1.0}, lambda: "at step 1")
    before = w.detach().clone()
    w.grad = torch.full((2,), 100.0)
    with pytest.raises(DivergenceError, match="gradient norm .* Lower --lr"):
        driver.step({"loss": 1.0}, lambda: "at step 2")
    assert torch.equal(w.detach(), before)


def test_stop_request_first_signal_asks_second_stops_now():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_metrics_on_resume_keep_the_checkpoints_steps_and_drop_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"split": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"split": "train", "st')  # killed while writing step 5
    with MetricsLog(path, start_step=2) as m:
        m.write({"split": "train", "step": 3, "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_a_changed_setting_but_not_a_resumable_one(tmp_path):
    from dataclasses import replace

    from directpo.training.config import TrainConfig

    from dataclasses import asdict

    from directpo.training.checkpoint import save_checkpoint

    cfg = TrainConfig(model="m", data="d.jsonl", output_dir=str(tmp_path), resume="latest")
    model = torch.nn.Linear(2, 2)
    driver, opt = _driver(list(model.parameters()))
    ckpt = save_checkpoint(tmp_path, 2, 0, model, opt, driver.scheduler, asdict(cfg), 0)
    run = RunDir(tmp_path)
    assert run.resume_point(replace(cfg, max_steps=9, progress=False)) == ckpt  # resumable changes
    with pytest.raises(ValueError, match="other settings \\(beta: 0.1 -> 0.2\\)"):
        run.resume_point(replace(cfg, beta=0.2))


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 1e6, 0.0])
def test_clipping_is_torchs_bit_for_bit_with_or_without_a_clip(max_norm):
    torch.manual_seed(0)
    ours = [torch.randn(n, requires_grad=True) for n in (5, 300, 7)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)  # (norm ≈ 3.5)
        b.grad = a.grad.clone()
    ours[1].grad = None  # (a parameter without a gradient is left out, as torch does)
    theirs[1].grad = None
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm > 0 else float("inf"))
    assert torch.equal(norm, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs) if a.grad is not None)
    clipped = 0 < max_norm < float(expected)
    assert clipped == (0 < max_norm < 3)  # both branches are taken: the test sees a clip and a pass-through
    if clipped:
        assert torch.linalg.vector_norm(torch.cat([a.grad for a in ours if a.grad is not None])) <= max_norm * 1.0001


def test_a_non_finite_gradient_gives_a_non_finite_norm_as_torch_does():
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert torch.isnan(clip_grad_norm([w], 1.0))
