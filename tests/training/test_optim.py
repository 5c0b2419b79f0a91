"""The optimizers `build_optimizer` makes: the paper's RMSprop, AdamW through torch's fused kernel."""
import pytest
import torch

from directpo.training.optim import build_optimizer, warmup_schedule


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((17, 5), (5,), (3, 4, 2))]


def _run(params, opt, steps: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_adamw_is_fused_and_matches_torchs_reference_loop():
    fused = _params()
    opt = build_optimizer(fused, "adamw", 1e-2, weight_decay=0.1)
    assert opt.param_groups[0]["fused"] is True
    loop = _params()
    ref = torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.1, foreach=False)
    after, expected = _run(fused, opt), _run(loop, ref)
    for a, b, start in zip(after, expected, _params()):
        assert (a - start).abs().max() > 1e-3  # the steps moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_frozen_parameters_are_left_out_and_subclasses_unfused():
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = build_optimizer([*_params(), frozen], "adamw", 1e-2)
    assert all(p is not frozen for p in opt.param_groups[0]["params"])
    # a subclass the fused kernel does not know (as FSDP's DTensor) keeps torch's default
    class Odd(torch.Tensor):
        pass
    odd = torch.ones(3).as_subclass(Odd).requires_grad_()
    assert not build_optimizer([odd], "adamw", 1e-2).param_groups[0]["fused"]


def test_rmsprop_is_the_papers_and_warmup_is_linear():
    params = _params()
    opt = build_optimizer(params, "rmsprop", 1e-6)
    assert isinstance(opt, torch.optim.RMSprop)
    sched = warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-6 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])


def _sparse_rows_run(params, opt, steps: int = 6, subnormal: bool = False) -> list[torch.Tensor]:
    """Embedding-like gradients: each step a few rows of each tensor get one, the others exactly zero,
    so square_avg keeps zeros (rows never seen) and decaying rows; `subnormal` starts it subnormal.
    The last tensor, tiny itself, gets tiny gradients: (1 − α)·g² is subnormal, the update visible."""
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        *embedding_like, tiny = params
        tiny.grad = torch.rand(tiny.shape, generator=g, dtype=tiny.dtype) * (1e-20 if tiny.dtype == torch.float32 else 1e-160)
        for p in embedding_like:
            grad = torch.zeros_like(p)
            rows = torch.randint(0, p.shape[0], (2,), generator=g)
            grad[rows] = torch.randn(grad[rows].shape, generator=g, dtype=p.dtype) * 1e-3
            p.grad = grad
        if subnormal and step == 1:
            for p in params:  # the rows no gradient reached yet
                sa = opt.state[p]["square_avg"]
                sa[sa == 0] = 1e-41 if p.dtype == torch.float32 else 1e-310
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.1}, {"maximize": True}, {"momentum": 0.9},
                                      {"centered": True}, {"eps": 1e-30}, {"subnormal": True}],
                         ids=["plain", "decay", "maximize", "momentum", "centered", "tiny-eps", "subnormal"])
def test_rmsprop_steps_as_torchs(dtype, settings, monkeypatch):
    """directpo's RMSprop moves parameters and state as torch's per-tensor RMSprop, zero and subnormal
    square_avg rows included. The plain update runs in torch's fused Adam kernel (β1 = 0, bias
    corrections 1): the same numbers to within rounding in the last bits (its square root is the
    correctly rounded one; torch's CPU sqrt is not always). With weight decay or maximize, torch's
    operations run with the root floored at the dtype's smallest normal: bit for bit torch's; with
    momentum, centered, or an eps too small for the floor to vanish, torch's own step runs."""
    from directpo.training.optim import RMSprop, _plain_rmsprop

    settings = dict(settings)
    subnormal = settings.pop("subnormal", False)
    fused_calls = []
    kernel = torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: (fused_calls.append(1), kernel(*a, **k))[1])

    def params():
        g = torch.Generator().manual_seed(0)
        tiny = torch.rand(5, generator=g, dtype=dtype) * (1e-12 if dtype == torch.float32 else 1e-150)
        return [*(torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype)) for shape in ((40, 6), (9,))),
                torch.nn.Parameter(tiny)]

    ours, theirs = params(), params()
    lr, steps = 1e-2, 6
    opt = RMSprop(ours, lr=lr, **settings)
    ref = torch.optim.RMSprop(theirs, lr=lr, foreach=False, **settings)
    floor_vanishes = dtype == torch.float64 or "eps" not in settings  # (1e-30's gap in fp64: 2e-46)
    assert _plain_rmsprop(opt.param_groups[0]) == (floor_vanishes and not {"momentum", "centered"} & settings.keys())
    a = _sparse_rows_run(ours, opt, steps=steps, subnormal=subnormal)
    b = _sparse_rows_run(theirs, ref, steps=steps, subnormal=subnormal)
    # the plain update (subnormal rows included) where the group is ours to step
    fused = _plain_rmsprop(opt.param_groups[0]) and not {"weight_decay", "maximize"} & settings.keys()
    assert bool(fused_calls) == fused
    if fused:  # a few ulps after `steps` steps; a wrong formula (lr = 1e-2) would be off by ~1e-3
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2 * steps * eps, atol=10 * lr * steps * eps)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(opt.state[p]["square_avg"], ref.state[q]["square_avg"], rtol=2 * steps * eps,
                                       atol=tiny)
    else:
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        for p, q in zip(ours, theirs):
            assert torch.equal(opt.state[p]["square_avg"], ref.state[q]["square_avg"])
    assert all(not torch.equal(x, y) for x, y in zip(a, params()))  # every tensor moved, the tiny one too
    for p, q in zip(ours, theirs):
        assert opt.state[p]["step"] == ref.state[q]["step"] == steps
        assert set(opt.state[p]) == set(ref.state[q])  # torch's state: checkpoints move between the two
    if not settings.get("weight_decay") and not subnormal:  # (decay makes every gradient dense)
        assert (opt.state[ours[0]]["square_avg"] == 0).any()  # rows no step touched: zeros under the root
    if subnormal:
        sa = opt.state[ours[0]]["square_avg"]
        assert ((sa > 0) & (sa < torch.finfo(dtype).tiny)).any()


def test_fused_rmsprop_leaves_the_gradients_and_falls_back_where_the_kernel_cannot_take_them():
    """The fused step passes the gradients as Adam's first moment (β1 = 0): it writes them with their own
    values. Non-contiguous gradients (which the kernel would read as contiguous) take torch's operations."""
    from directpo.training.optim import RMSprop

    g = torch.Generator().manual_seed(3)
    p, q = (torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(0))) for _ in range(2))
    grad = torch.randn(6, 8, generator=g)
    p.grad, q.grad = grad.clone(), grad.clone()
    RMSprop([p], lr=1e-2).step()
    torch.optim.RMSprop([q], lr=1e-2, foreach=False).step()
    assert torch.equal(p.grad, grad)
    torch.testing.assert_close(p, q, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-8)
    r, s = (torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0))) for _ in range(2))
    r.grad, s.grad = grad.t(), grad.t()  # (8, 6) views of the (6, 8) tensor: not contiguous
    RMSprop([r], lr=1e-2).step()
    torch.optim.RMSprop([s], lr=1e-2, foreach=False).step()
    assert torch.equal(r, s)  # torch's operations, bit for bit


def test_rmsprop_floor_holds_only_where_the_root_vanishes_beside_eps():
    from directpo.training.optim import _root_vanishes

    assert _root_vanishes(1e-8, torch.float32) and _root_vanishes(1e-8, torch.float64)
    assert _root_vanishes(1e-11, torch.float32)
    assert not _root_vanishes(1e-13, torch.float32)  # sqrt(tiny) = 1.1e-19 is no longer under half a gap
    assert not _root_vanishes(0.0, torch.float32) and not _root_vanishes(float("inf"), torch.float32)
    # exhaustively at the edge: every subnormal's root, and tiny's, add to eps as 0 does
    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        xs = torch.tensor([0.0, tiny * 2**-20, tiny / 2, tiny * (1 - 2**-20), tiny], dtype=dtype)
        assert torch.equal(xs.sqrt().add_(1e-8), torch.full_like(xs, 1e-8))


def test_a_checkpoint_keeps_the_state_and_leaves_the_kernel_choice_to_the_loader(tmp_path):
    """A fused run's checkpoint resumes under an unfused optimizer (as FSDP's) and back, each with
    its own kernel, and continues as the uninterrupted run does."""
    from directpo.training.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(5, 3)
    opt = build_optimizer(model.parameters(), "adamw", 1e-2)
    sched = warmup_schedule(opt, 2)
    _run(list(model.parameters()), opt, steps=2)
    path = save_checkpoint(tmp_path, 2, 0, model, opt, sched, config={})
    saved = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]
    assert "fused" not in saved["param_groups"][0] and saved["state"]

    other = torch.nn.Linear(5, 3)
    loop = torch.optim.AdamW(other.parameters(), lr=5.0, foreach=False)
    load_checkpoint(path, other, loop, warmup_schedule(loop, 2))
    assert loop.param_groups[0]["fused"] is None and loop.param_groups[0]["foreach"] is False
    assert loop.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # the state itself came back
    fresh = torch.nn.Linear(5, 3)
    again = build_optimizer(fresh.parameters(), "adamw", 1e-2)
    load_checkpoint(path, fresh, again, warmup_schedule(again, 2))
    assert again.param_groups[0]["fused"] is True
    a, b = _run(list(model.parameters()), opt, 2), _run(list(fresh.parameters()), again, 2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- learning-rate schedules (#29 item 3) ----

def test_schedules_in_closed_form():
    import math

    from directpo.training.optim import lr_factor

    w, t = 3, 13  # warm-up 3 steps, then 10 of decay
    assert [lr_factor(s, w, t) for s in range(3)] == [1 / 3, 2 / 3, 1.0]
    assert all(lr_factor(s, w, t, "constant") == 1.0 for s in range(3, t))
    assert [lr_factor(s, w, t, "linear") for s in (3, 8, 12)] == [1.0, 0.5, pytest.approx(0.1)]
    assert lr_factor(8, w, t, "cosine") == pytest.approx(0.5) and lr_factor(3, w, t, "cosine") == 1.0
    assert lr_factor(12, w, t, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(8, w, t, "cosine_with_min_lr", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(99, w, t, "cosine_with_min_lr", 0.2) == pytest.approx(0.2)  # past the end: the floor


def test_every_step_trains_at_the_scheduled_lr_and_a_resume_continues_the_curve(tiny_model, tmp_path, monkeypatch):
    """The lr of each metrics line equals the closed form; a run interrupted at step 4 and resumed
    ends with the weights of the uninterrupted one."""
    from conftest import review_pairs
    from safetensors.torch import load_file

    import directpo
    from directpo.training import run as run_mod
    from directpo.training.optim import lr_factor

    data = review_pairs(tmp_path)
    settings = dict(model=str(tiny_model), data=str(data), batch_size=4, micro_batch_size=4, max_steps=8, lr=1e-3,
                    optimizer="adamw", warmup_ratio=0.25, lr_scheduler="cosine_with_min_lr", min_lr_ratio=0.1,
                    max_length=64, progress=False, threads=1)
    full = directpo.train(output_dir=str(tmp_path / "full"), **settings)
    lrs = [r["lr"] for r in full.metrics]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 2, 8, "cosine_with_min_lr", 0.1) for s in range(8)], rel=1e-12)
    looks = iter([False, False, False, True])  # Ctrl-C seen after step 4
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        directpo.train(output_dir=str(tmp_path / "cut"), **settings)
    directpo.train(output_dir=str(tmp_path / "cut"), resume="latest", **settings)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_min_lr_ratio_needs_its_schedule(tmp_path, capsys):
    from directpo.cli import main

    assert main(["train", "--model", "m", "--data", "d.jsonl", "--output-dir", str(tmp_path / "o"),
                 "--min-lr-ratio", "0.1"]) == 2
    assert "--min-lr-ratio: the 'constant' schedule does not read it" in capsys.readouterr().err


# ---- bitsandbytes' 8-bit AdamW (#29 item 2) ----

@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_keeps_8bit_moments_and_its_checkpoint_resumes_exactly(tmp_path, name):
    """Moments of a large tensor are 8-bit codes (one fp32 absmax per 256), a small one's fp32; the
    state goes through a checkpoint and the restored optimizer continues bit-identically."""
    bnb = pytest.importorskip("bitsandbytes")
    from directpo.training.checkpoint import load_checkpoint, save_checkpoint

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 3))  # 6144 + 192 weights

    m = model()
    opt = build_optimizer(m.parameters(), name, 1e-2, weight_decay=0.1)
    assert isinstance(opt, bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit)
    sched = warmup_schedule(opt, 2)
    start = [p.detach().clone() for p in m.parameters()]
    _run(list(m.parameters()), opt, steps=3)
    big, small = opt.state[m[0].weight], opt.state[m[1].weight]
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].numel() == 6144 // 256
    assert small["state1"].dtype == torch.float32  # under bitsandbytes' min_8bit_size (4096)
    assert all((p - s).abs().max() > 1e-3 for p, s in zip(m.parameters(), start))
    path = save_checkpoint(tmp_path, 3, 0, m, opt, sched, config={})

    fresh = model()
    again = build_optimizer(fresh.parameters(), name, 1e-2, weight_decay=0.1)
    load_checkpoint(path, fresh, again, warmup_schedule(again, 2))
    a, b = _run(list(m.parameters()), opt, 3), _run(list(fresh.parameters()), again, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_adamw8bit_run_stopped_and_resumed_ends_bit_identical(tiny_model, tmp_path, monkeypatch, lora):
    """A run stopped after step 3 (its checkpoint written then) and resumed ends with the weights of
    the uninterrupted run, with or without LoRA."""
    pytest.importorskip("bitsandbytes")
    from conftest import review_pairs
    from safetensors.torch import load_file

    import directpo
    from directpo.training import run as run_mod

    settings = dict(model=str(tiny_model), data=str(review_pairs(tmp_path)), batch_size=4, micro_batch_size=4,
                    max_steps=6, lr=1e-2 if lora else 1e-3, optimizer="adamw8bit", warmup_steps=0, max_length=64,
                    progress=False, threads=1, lora_r=4 if lora else 0)
    directpo.train(output_dir=str(tmp_path / "full"), **settings)
    looks = iter([False, False, True])  # Ctrl-C seen after step 3
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        directpo.train(output_dir=str(tmp_path / "cut"), **settings)
    directpo.train(output_dir=str(tmp_path / "cut"), resume="latest", **settings)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
    start = load_file(str(tiny_model / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # it trained: weights moved (LoRA: the B factors, which start at 0)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k) if lora else \
        any(not torch.equal(a[k], start[k]) for k in a)
