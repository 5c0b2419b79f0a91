"""Data-parallel training with torchrun (gloo, 2 CPU processes) equals single-process training."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_process_group
import torch
from safetensors.torch import load_file

from directpo.toy import review_task, write_jsonl
from directpo.training.checkpoint import list_checkpoints
from directpo.training.distributed import Dist

FAULTS = Path(__file__).resolve().parents[1] / "faults" / "inject.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_shards_cover_each_example_once():
    idx = list(range(11))
    shards = [Dist(rank=r, world=3).shard(idx) for r in range(3)]
    assert sorted(sum(shards, [])) == idx
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(shards) for b in shards[i + 1:])


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    rows, _ = review_task(n_train=40, n_eval=8, seed=21)
    return write_jsonl(rows, tmp_path_factory.mktemp("ddp") / "d.jsonl")


_COMMON = ("--lr", "0.5", "--optimizer", "sgd", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5",
           "--warmup-steps", "0", "--max-grad-norm", "0", "--max-length", "64", "--no-progress", "--threads", "1")


def _two_runs(tiny_model, tmp_path, data, mode: str, fault: list[str] = ()):
    """The same 5 SGD steps in one process and in two (torchrun on tests/faults/inject.py, which reports
    what each rank held around FSDP sharding and can inject a fault): (single, multi) metrics,
    weights, and the multi-process stderr."""
    # Plain SGD: the update is lr × the summed gradient, so a wrong reduction shows in the weights
    # (Adam and RMSprop divide it out), and float re-association noise stays ~1e-7 relative
    # whatever the CPU (Adam turns it into lr-sized steps on near-zero gradients).
    common = ["--model", str(tiny_model), "--data", str(data), *_COMMON]
    if mode == "ddp-live-ref":
        common.append("--no-precompute-ref")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one = _single_process_run(tuple(common), env)
    multi = subprocess.run([*TORCHRUN, str(FAULTS), "--report-fsdp-init", *fault, "train", *common, "--output-dir",
                            str(tmp_path / "two"), *(["--fsdp", "--eval-data", str(data), "--eval-every", "2"]
                                                     if mode == "fsdp" else [])],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    b = [m for m in map(json.loads, open(tmp_path / "two" / "metrics.jsonl")) if m["split"] == "train"]
    return one, (b, load_file(str(tmp_path / "two" / "model.safetensors"))), multi.stderr


_SINGLE_RUNS: dict = {}


def _single_process_run(common: tuple, env: dict):
    """(metrics, weights) of `directpo train *common` in one process, run once per settings: the
    equality test and the broken-all-reduce tests compare against the same run."""
    if common not in _SINGLE_RUNS:
        import tempfile

        from conftest import SCRATCH

        out = Path(tempfile.mkdtemp(prefix="directpo-single-", dir=SCRATCH)) / "one"
        single = subprocess.run([sys.executable, "-m", "directpo", "train", *common, "--output-dir", str(out)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert single.returncode == 0, single.stderr
        _SINGLE_RUNS[common] = ([json.loads(x) for x in open(out / "metrics.jsonl")],
                                load_file(str(out / "model.safetensors")))
    return _SINGLE_RUNS[common]


def _equal_runs(one, two, start: dict) -> list[str]:
    """Where two runs differ by more than float re-association explains (empty: equal). Per step:
    the loss and the margin (1e-5 absolute) and the gradient norm (1e-4 relative: the reduced
    gradient itself); the weights' updates w − w0 within 1e-4 of the largest update."""
    (a, wa), (b, wb) = one, two
    bad = [] if len(a) == len(b) == 5 else [f"{len(a)} vs {len(b)} metrics lines"]
    for x, y in zip(a, b):
        for key, tol in (("loss", 1e-5), ("rewards/margins", 1e-5), ("grad_norm", 1e-4 * x["grad_norm"])):
            if abs(x[key] - y[key]) > tol:
                bad.append(f"step {x['step']} {key}: {x[key]} vs {y[key]}")
    update = max((wa[k] - start[k]).abs().max().item() for k in wa)
    for k in wa:
        diff = (wa[k] - wb[k]).abs().max().item()
        if diff > 1e-4 * update:
            bad.append(f"{k}: weights differ by {diff:.2e} (largest update {update:.2e})")
    return bad


@pytest.mark.parametrize("mode", ["ddp", "ddp-live-ref", "fsdp"])
def test_two_process_run_matches_single_process(tiny_model, tmp_path, ddp_data, mode):
    one, two, err = _two_runs(tiny_model, tmp_path, ddp_data, mode)
    start = load_file(str(tiny_model / "model.safetensors"))
    assert _equal_runs(one, two, start) == []
    assert all(m["tokens_per_s"] > 0 for m in one[0] + two[0])
    if mode == "fsdp":  # no rank read the whole weights (meta loading); each holds its shards, the LM head's too
        wa = one[1]
        total = sum(t.numel() for t in wa.values())
        held = {int(r): (int(a), int(b), int(c)) for r, a, b, c in re.findall(
            r"rank (\d): (\d+) parameter elements loaded before sharding, (\d+) held after; (\d+) whole-model loads",
            err)}
        assert sorted(held) == [0, 1] and all(h[0] == 0 and h[2] == 0 for h in held.values())
        assert all(h[1] == pytest.approx(total / 2, rel=0.01) for h in held.values())


def test_fsdp_bf16_mixed_precision_keeps_fp32_master_weights(tiny_model, tmp_path, ddp_data):
    """`--fsdp --precision bf16` on 2 processes: the run follows the one-process bf16 run within
    bf16 rounding, saves fp32 weights, and is not the fp32 run (the equality tests hold FSDP fp32
    to 1e-4 of the update; bf16 lands ~100x further). The policies themselves: the next test."""
    common = ("--model", str(tiny_model), "--data", str(ddp_data), *_COMMON)  # the equality tests' order: one cache
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one16 = _single_process_run((*common, "--precision", "bf16"), env)
    one32 = _single_process_run(common, env)  # fp32 (auto is fp32 in the tests): the equality tests' run
    two = subprocess.run([*TORCHRUN, "-m", "directpo", "train", *common, "--precision", "bf16", "--fsdp",
                          "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = [m["loss"] for m in map(json.loads, open(tmp_path / "two" / "metrics.jsonl")) if m["split"] == "train"]
    weights = load_file(str(tmp_path / "two" / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert losses == pytest.approx([m["loss"] for m in one16[0]], abs=1e-3)
    update = max((one16[1][k] - start[k]).abs().max().item() for k in start)
    assert _max_diff(weights, one16[1]) < 0.03 * update
    assert _max_diff(weights, one32[1]) > 1e-3 * update


def test_shard_model_policies_blocks_bf16_and_the_head_fp32(tiny_model):
    """`Dist.shard_model(bf16=True)` in a one-process group: every block and the backbone get
    FSDP2's MixedPrecisionPolicy (bf16 params, fp32 reductions); the LM head is sharded too, with
    no policy (gathered and multiplied in fp32, as `label_logprobs` wants); shards stay fp32."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from directpo.models import load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = Dist(0, 1, 0).shard_model(load_model(str(tiny_model)), bf16=True)
        groups = {name: mod._get_fsdp_state()._fsdp_param_group
                  for name, mod in (("block", model.model.layers[0]), ("backbone", model.model),
                                    ("head", model.lm_head))}
        for name in ("block", "backbone"):
            policy = groups[name].mp_policy
            assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32), name
        assert groups["head"].mp_policy.param_dtype is None
        assert isinstance(model.lm_head.weight, DTensor)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fault", ["skip", "mean"])
def test_the_equality_check_catches_a_broken_all_reduce(tiny_model, tmp_path, ddp_data, fault):
    """The same comparison fails when the gradients are not summed over ranks (each rank steps on
    its half of the batch) or are averaged instead of summed (half the update)."""
    one, two, _ = _two_runs(tiny_model, tmp_path, ddp_data, "ddp", ["--break-all-reduce", fault])
    bad = _equal_runs(one, two, load_file(str(tiny_model / "model.safetensors")))
    assert any("grad_norm" in b for b in bad) and any("weights differ" in b for b in bad), bad


def _train(argv: list[str], kill_during_save: int | None = None) -> tuple[int, str]:
    """`directpo train ...` in a fresh process; returns (exit code, end of stderr). With
    `kill_during_save=N` (2 processes), torchrun runs tests/faults/inject.py, whose rank 0 dies mid-write of
    checkpoint N."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if kill_during_save is None:
        cmd = [sys.executable, "-m", "directpo", "train", *argv]
    else:
        assert argv[argv.index("--nproc") + 1] == "2"
        cmd = [*TORCHRUN, str(FAULTS), "--kill-during-save", str(kill_during_save), "train",
               *[a for i, a in enumerate(argv) if a != "--nproc" and argv[i - 1] != "--nproc"]]
    return run_process_group(cmd, env)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class _FullCheckpointRuns:
    """Runs of one setting (full weights or LoRA), each made once and shared by the tests below:
    `run(out, *flags)` trains 6 AdamW steps with a full-format checkpoint every 2 into `root/out`."""

    def __init__(self, root: Path, tiny_model: Path, lora: bool):
        rows, _ = review_task(n_train=40, n_eval=8, seed=21)
        data = write_jsonl(rows, root / "d.jsonl")
        self.root, self.lora, self.made = root, lora, {}
        self.common = ["--model", str(tiny_model), "--data", str(data), "--lr", "1e-3", "--optimizer", "adamw",
                       "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "6", "--warmup-steps", "2",
                       "--max-length", "64", "--save-every", "2", "--no-progress", "--threads", "1",
                       *(["--lora-r", "4", "--lr", "1e-2"] if lora else [])]

    def run(self, out, *extra, kill_during_save=None):
        return _train([*self.common, "--output-dir", str(self.root / out), *extra], kill_during_save)

    def uninterrupted(self, out: str) -> Path:
        """The run "fsdp" (2 processes) or "one" (1 process), made once."""
        if out not in self.made:
            rc, err = self.run(out, *(FSDP if out == "fsdp" else []))
            assert rc == 0, err
            self.made[out] = self.root / out
        return self.made[out]

    def weights(self, out):
        return load_file(str(self.root / out / ("adapter_model.safetensors" if self.lora else "model.safetensors")))


FSDP = ["--nproc", "2", "--fsdp"]


@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"])
def full_ck_runs(request, tiny_model, tmp_path_factory):
    return _FullCheckpointRuns(tmp_path_factory.mktemp("fullck"), tiny_model, request.param)


def test_fsdp_checkpoints_resume_exactly_and_are_ordinary(full_ck_runs):
    """An FSDP run killed (SIGKILL) mid-write of a (full-format) checkpoint and resumed ends
    bit-identical to an uninterrupted one; its checkpoints hold whole weights (or adapters) and
    optimizer state, the same tensors as a single process's. (LoRA: `make test-slow`.)"""
    runs = full_ck_runs
    fsdp, one = runs.uninterrupted("fsdp"), runs.uninterrupted("one")
    rc, _ = runs.run("killed", *FSDP, kill_during_save=4)  # rank 0 dies writing step 4
    assert rc != 0
    assert [p.name for p in list_checkpoints(runs.root / "killed")] == ["step-00000002"]
    rc, err = runs.run("killed", *FSDP, "--resume")
    assert rc == 0, err
    assert "resumed from" in err and "step 2" in err
    assert _max_diff(runs.weights("fsdp"), runs.weights("killed")) == 0.0

    # An FSDP checkpoint is an ordinary one: the same tensors as a single-process checkpoint.
    ck_fsdp, ck_one = (r / "checkpoints" / "step-00000002" for r in (fsdp, one))
    wf, wo = load_file(str(ck_fsdp / "model.safetensors")), load_file(str(ck_one / "model.safetensors"))
    assert _max_diff(wf, wo) < 1e-5
    of, oo = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"] for c in (ck_fsdp, ck_one))
    assert of["param_groups"] == oo["param_groups"]
    assert of["state"].keys() == oo["state"].keys()
    for i in oo["state"]:
        assert _max_diff(of["state"][i], oo["state"][i]) < 1e-5, i


@pytest.mark.slow  # two more runs, ~25 s on 2 cores: the tensors are already shown equal above
def test_full_checkpoints_resume_across_fsdp_and_one_process(full_ck_runs):
    """An FSDP run's checkpoint resumes in one process, and a single process's under FSDP, each
    ending where that mode's uninterrupted run ended."""
    runs = full_ck_runs
    for out, extra, source, same_as in [("fsdp-to-one", [], "fsdp", "one"), ("one-to-fsdp", FSDP, "one", "fsdp")]:
        ck = runs.uninterrupted(source) / "checkpoints" / "step-00000002"
        runs.uninterrupted(same_as)
        rc, err = runs.run(out, *extra, "--resume", str(ck))
        assert rc == 0, err
        assert _max_diff(runs.weights(same_as), runs.weights(out)) < 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~45 s on 2 cores
def test_two_nodes_on_the_loopback_match_a_single_process(tiny_model, tmp_path, ddp_data):
    """Two `directpo train --nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1 ...` commands, one process
    each, meeting on the loopback as two nodes would (each relaunches itself under torchrun, static
    rendezvous on node 0's port): the run equals the single-process one, as the 2-process run on one
    node does; rank 0 of the two writes the run directory, and every rank its shards of the (sharded)
    checkpoint, into the directory both share."""
    common = ["--model", str(tiny_model), "--data", str(ddp_data), "--lr", "0.5", "--optimizer", "sgd",
              "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5", "--warmup-steps", "0",
              "--max-grad-norm", "0", "--max-length", "64", "--no-progress", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one = _single_process_run(tuple(common), env)
    out, port = tmp_path / "nodes", _free_port()

    def node(rank: int) -> list[str]:
        return [sys.executable, "-m", "directpo", "train", "--nnodes", "2", "--node-rank", str(rank),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc", "1", *common,
                "--output-dir", str(out), "--save-every", "5", "--checkpoint-format", "sharded"]

    nodes = [subprocess.Popen(node(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for r in range(2)]
    try:  # (600 s: each node starts Python three times, launcher, torchrun, worker; a loaded machine needs it)
        errs = [p.communicate(timeout=600)[1] for p in nodes]
    except subprocess.TimeoutExpired:
        for p in nodes:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    metrics = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["split"] == "train"]
    assert _equal_runs(one, (metrics, load_file(str(out / "model.safetensors"))),
                       load_file(str(tiny_model / "model.safetensors"))) == []
    shards = out / "checkpoints" / "step-00000005" / "shards"
    assert (shards / ".metadata").exists() and len(list(shards.glob("*.distcp"))) >= 1
    # The workers ran without the launcher flags: one node's view, recorded as before.
    recorded = json.loads((out / "directpo_config.json").read_text())
    assert (recorded["nnodes"], recorded["node_rank"], recorded["nproc"]) == (1, 0, 0)
