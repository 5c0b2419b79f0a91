"""--optimizer-offload (issue #29 item 5): the optimizer stepped on host copies of the weights. On
this CPU-only machine the run-level tests make `offload_applies` say yes, so the whole path (copies
out, step on the host, copies back, checkpoint and resume) runs as it would on CUDA."""
import copy

import pytest
import torch

from directpo.config import ConfigError
from directpo.training import TrainConfig
from directpo.training import offload as O
from directpo.training.optim import build_optimizer


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)


def _train(net, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g, dtype=next(net.parameters()).dtype)
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "rmsprop", "sgd"])
def test_offloaded_steps_equal_plain_ones_bit_for_bit(name):
    plain, off = _net(), _net()
    build = lambda ps: build_optimizer(ps, name, 1e-2, 0.01)  # noqa: E731
    _train(plain, build(plain.parameters()), 5)
    opt = O.OffloadedOptimizer(off.parameters(), build)
    _train(off, opt, 5)
    start = _net()
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), start.parameters()))  # it trained
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), off.parameters()))
    assert all(h.device.type == "cpu" and h.data_ptr() != p.data_ptr() for h, p in zip(opt.host, opt.params))
    assert all(p.grad is None for p in off.parameters()) and all(h.grad is None for h in opt.host)


def test_its_state_dict_is_the_plain_optimizers_so_checkpoints_move_between_the_two():
    plain, off = _net(), _net()
    build = lambda ps: build_optimizer(ps, "adamw", 1e-2)  # noqa: E731
    p_opt, o_opt = build(plain.parameters()), O.OffloadedOptimizer(off.parameters(), build)
    _train(plain, p_opt, 3)
    _train(off, o_opt, 3)
    a, b = p_opt.state_dict(), o_opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and O.MASTER_KEY not in b
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    # a fresh offloaded optimizer loaded from the plain one's state continues as the plain one does
    resumed = O.OffloadedOptimizer(off.parameters(), build)
    resumed.load_state_dict(copy.deepcopy(p_opt.state_dict()))  # (as from disk: the plain one's tensors steps on)
    _train(plain, p_opt, 2, seed=7)
    _train(off, resumed, 2, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(plain.parameters(), off.parameters()))


def test_weights_below_fp32_keep_an_fp32_master_copy_that_the_checkpoint_carries():
    net = _net(torch.bfloat16)
    build = lambda ps: build_optimizer(ps, "sgd", 1e-3)  # noqa: E731
    opt = O.OffloadedOptimizer(net.parameters(), build)
    assert all(h.dtype == torch.float32 for h in opt.host)
    _train(net, opt, 3)
    sd = opt.state_dict()
    assert len(sd[O.MASTER_KEY]) == len(opt.host)
    # the master holds bits the bf16 weights lack: a resume from the weights alone would lose them
    assert any(not torch.equal(h, p.float()) for h, p in zip(opt.host, net.parameters()))
    again = O.OffloadedOptimizer(net.parameters(), build)
    again.load_state_dict(sd)
    assert all(torch.equal(h, k) for h, k in zip(again.host, opt.host))


def test_refused_with_fsdp_in_one_line_and_a_no_op_on_the_cpu(capsys):
    with pytest.raises(ConfigError, match="with --fsdp use --fsdp-cpu-offload") as e:
        TrainConfig(model="m", data="d", output_dir="o", optimizer_offload=True, fsdp=True).validate()
    assert "\n" not in str(e.value)
    cfg = TrainConfig(model="m", data="d", output_dir="o", optimizer_offload=True)
    opt = O.make_optimizer(_net().parameters(), cfg, torch.device("cpu"))
    assert not isinstance(opt, O.OffloadedOptimizer)
    assert "--optimizer-offload: nothing to move on cpu" in capsys.readouterr().err


def test_a_run_with_offload_equals_one_without_and_resumes_bit_identically(tiny_model, tmp_path, monkeypatch,
                                                                           one_thread):
    from conftest import review_pairs
    from safetensors.torch import load_file

    import directpo
    from directpo.training import run as run_mod

    data = review_pairs(tmp_path)
    settings = dict(model=str(tiny_model), data=str(data), batch_size=4, micro_batch_size=2, max_steps=6, lr=1e-3,
                    optimizer="adamw", max_length=64, progress=False, threads=1)
    directpo.train(output_dir=str(tmp_path / "plain"), **settings)
    monkeypatch.setattr(O, "offload_applies", lambda device: True)  # host memory as if it were another
    made, real = [], O.OffloadedOptimizer
    monkeypatch.setattr(O, "OffloadedOptimizer", type("Seen", (real,), {
        "__init__": lambda self, *a, **k: (made.append(self), real.__init__(self, *a, **k))[1]}))
    directpo.train(output_dir=str(tmp_path / "offload"), optimizer_offload=True, **settings)
    assert len(made) == 1
    looks = iter([False, False, True])  # stopped after step 3
    monkeypatch.setattr(run_mod.StopRequest, "requested", lambda self, dist=None: next(looks, False))
    with pytest.raises(run_mod.Interrupted):
        directpo.train(output_dir=str(tmp_path / "cut"), optimizer_offload=True, **settings)
    directpo.train(output_dir=str(tmp_path / "cut"), optimizer_offload=True, resume="latest", **settings)
    assert len(made) == 3
    w = {n: load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "offload", "cut")}
    start = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(w["plain"][k], start[k]) for k in w["plain"])
    for k in w["plain"]:
        assert torch.equal(w["plain"][k], w["offload"][k]) and torch.equal(w["plain"][k], w["cut"][k]), k


def test_plan_moves_the_optimizer_state_to_the_host_and_suggests_it_after_checkpointing():
    from directpo.training import plan as P

    s = P.Shape(params=1_000_000_000, head=0, block=50_000, layers=2, hidden=64, q_dim=64, kv_dim=128,
                intermediate=256, lora_per_rank=1000, tied=True, vocab=1000)
    base = dict(model="m", batch_size=1, micro_batch_size=1, max_length=64, optimizer="adamw")
    on, off = (P.memory_plan(s, P.PlanConfig(**base, optimizer_offload=o)) for o in (True, False))
    assert on["host"] == {"optimizer": off["parts"]["optimizer"]} and off["parts"]["optimizer"] > 0
    assert on["parts"]["optimizer"] == 0 and on["total"] == off["total"] - off["parts"]["optimizer"]
    # 1e9 parameters, adamw: 4 GB weights + 4 gradients + 8 optimizer state; 12 GiB fits only offloaded
    fix = P.suggest(s, P.PlanConfig(**base, memory_per_device=12.0))
    assert fix is not None and fix[0].optimizer_offload and fix[0].lora_r == 0
    with pytest.raises(ConfigError, match="with --fsdp use --fsdp-cpu-offload"):
        P.PlanConfig(**base, optimizer_offload=True, fsdp=True, nproc=2).validate()
