"""`directpo train|sft --nproc K [--nnodes N --node-rank R --master-addr A --master-port P]`: the
torchrun command line it becomes, the settings it refuses, and the workers' command line. No
process is started here (`os.execv` is replaced); tests/training/test_distributed.py runs two nodes
on the loopback through this launcher."""
import sys

import pytest

import directpo.training.launch as launch_module
from directpo.cli import main, make_parser
from directpo.config import ConfigError, build_config
from directpo.training.config import TrainConfig
from directpo.training.launch import LAUNCHER_FLAGS, child_argv, needs_launch, torchrun_command

RUN = ["--model", "M", "--data", "D.jsonl", "--output-dir", "/shared/out", "--lr", "1e-5"]


def _cfg(command: str, argv: list[str]) -> TrainConfig:
    return build_config(make_parser(command).parse_args([command, *argv]), TrainConfig)


def test_one_node_of_two_becomes_a_static_rendezvous():
    argv = ["train", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node-a", "--master-port", "29511",
            "--nproc", "8", *RUN, "--fsdp"]
    assert torchrun_command(_cfg("train", argv[1:]), argv) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1", "--master-addr=node-a",
        "--master-port=29511", "--nproc-per-node=8", "-m", "directpo", "train", *RUN, "--fsdp"]


@pytest.mark.parametrize("nproc", ["0", "1"])
def test_several_nodes_launch_one_process_each_when_nproc_is_one_or_unset(nproc):
    argv = ["sft", *RUN, "--nnodes=3", "--node-rank=2", "--nproc", nproc]
    cfg = _cfg("sft", argv[1:])
    assert needs_launch(cfg, environ={})
    cmd = torchrun_command(cfg, argv)
    assert "--nproc-per-node=1" in cmd and "--nnodes=3" in cmd and "--node-rank=2" in cmd
    assert "--master-addr=127.0.0.1" in cmd and "--master-port=29500" in cmd  # the defaults
    assert cmd[cmd.index("directpo"):] == ["directpo", "sft", *RUN]


def test_one_node_keeps_the_standalone_launch():
    argv = ["train", *RUN, "--nproc=4"]
    cmd = torchrun_command(_cfg("train", argv[1:]), argv)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "directpo",
                       "train", *RUN]
    assert not any(a.startswith(("--nnodes", "--node-rank", "--master")) for a in cmd)


@pytest.mark.parametrize("argv, launches", [
    ([], False), (["--nproc", "1"], False), (["--nproc", "2"], True), (["--nnodes", "2"], True),
    (["--nnodes", "2", "--nproc", "1"], True)])
def test_what_launches(argv, launches):
    cfg = _cfg("train", [*RUN, *argv])
    assert needs_launch(cfg, environ={}) is launches
    assert not needs_launch(cfg, environ={"WORLD_SIZE": "2"})  # a worker never launches again


def test_workers_get_no_launcher_flag_in_either_spelling():
    argv = ["train", "--nnodes", "2", "--node-rank=1", *RUN, "--master-addr", "10.0.0.1", "--master-port=29500",
            "--nproc", "8", "--fsdp", "--checkpoint-format", "sharded"]
    child = child_argv(argv)
    assert child == ["train", *RUN, "--fsdp", "--checkpoint-format", "sharded"]
    assert not any(a.split("=")[0] in LAUNCHER_FLAGS for a in child)
    cfg = _cfg("train", child[1:])  # what a worker reads: one node, one process, nothing to launch
    assert (cfg.nnodes, cfg.node_rank, cfg.nproc) == (1, 0, 0) and not needs_launch(cfg, environ={})


@pytest.mark.parametrize("flags, says", [
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be < --nnodes (the nodes are numbered 0 to 1); "
                                            "got --node-rank 2 with --nnodes 2"),
    (["--node-rank", "1"], "--node-rank must be < --nnodes"),
    (["--nnodes", "0"], "--nnodes must be ≥ 1"),
    (["--node-rank", "-1"], "--node-rank must be ≥ 0"),
    (["--master-port", "0"], "--master-port must be ≥ 1 and ≤ 65535 (with --nnodes > 1: TCP port on node 0 where "
                             "the nodes meet); got 0"),
    (["--master-port", "65536"], "--master-port must be ≥ 1 and ≤ 65535"),
    (["--nnodes", "2", "--master-addr", " "], "--master-addr is empty"),
])
def test_bad_node_settings_are_refused(flags, says):
    with pytest.raises(ConfigError) as e:
        _cfg("train", [*RUN, *flags]).validate()
    assert says in str(e.value)


def test_the_command_execs_torchrun_after_checking_the_settings(monkeypatch, capsys):
    """`directpo train --nnodes 2 ...` becomes torchrun (exec, so signals and the exit status are
    torchrun's); a bad setting is one line and exit 2 from the launcher, before any worker starts."""
    calls = []
    monkeypatch.setattr(launch_module.os, "execv", lambda path, cmd: calls.append(cmd))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch_module.os, "name", "posix")
    main(["train", *RUN, "--nnodes", "2", "--node-rank", "0", "--master-port", "29501"])
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=0",
                      "--master-addr=127.0.0.1", "--master-port=29501", "--nproc-per-node=1", "-m", "directpo",
                      "train", *RUN]]
    assert main(["train", *RUN, "--nnodes", "2", "--node-rank", "0", "--batch-size", "6"]) == 2
    assert "--batch-size 6 must be a multiple of --micro-batch-size 8" in capsys.readouterr().err
    assert main(["sft", *RUN, "--nproc", "2", "--node-rank", "3"]) == 2
    assert "--node-rank must be < --nnodes" in capsys.readouterr().err
    assert len(calls) == 1


def test_pipeline_refuses_several_nodes(capsys):
    assert main(["pipeline", *RUN, "--nnodes", "2"]) == 2
    assert "directpo pipeline runs in one process, on one node" in capsys.readouterr().err
