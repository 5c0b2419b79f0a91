"""Several processes, on one node or several: `directpo train|sft --nproc K [--nnodes N ...]`.

The command re-runs itself under torchrun (`python -m torch.distributed.run`), which starts K
processes on this node; each runs the same `directpo ...` command line less the launcher flags,
sees WORLD_SIZE/RANK/LOCAL_RANK and joins the process group (`distributed.init_from_env`).

    one node  (--nnodes 1, --nproc K > 1):  torchrun --standalone --nproc-per-node K
    N nodes   (--nnodes N > 1, K ≥ 1):      torchrun --nnodes N --node-rank R --master-addr A
                                                     --master-port P --nproc-per-node K

Several nodes use torchrun's static rendezvous rather than c10d: the user already names each
node's rank and node 0's address (SLURM gives both), the global ranks then follow the node ranks
(node 0 holds global rank 0, which writes the run directory, and hosts the rendezvous store on
A:P), and no rendezvous id has to be agreed between the nodes. c10d would number the nodes by
arrival and ignore --node-rank. One node keeps --standalone: torchrun picks a free port, so two
runs on one machine do not collide on 29500.

The launcher replaces itself with torchrun (exec): its exit status is torchrun's, and a Ctrl-C or
a SIGTERM (scancel, a SLURM time limit) reaches torchrun directly, which passes it to the workers
and waits for them to checkpoint and stop; a parent waiting in between could only get in the way.
"""
from __future__ import annotations

import os
import subprocess
import sys

# The flags that only shape the launch: a child given them again would be told to launch again
# (it does not, seeing WORLD_SIZE, but its command line is also the one its model card records).
LAUNCHER_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def needs_launch(cfg, environ=None) -> bool:
    """Whether this process must start the workers: several of them asked for, and not itself one
    of them (torchrun sets WORLD_SIZE in every worker)."""
    environ = os.environ if environ is None else environ
    return "WORLD_SIZE" not in environ and (cfg.nproc > 1 or cfg.nnodes > 1)


def without_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def child_argv(argv: list[str]) -> list[str]:
    """The command line every worker runs: `argv` (the command word and its flags) less the
    launcher flags."""
    for flag in LAUNCHER_FLAGS:
        argv = without_flag(argv, flag)
    return argv


def torchrun_command(cfg, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `directpo *argv` as `cfg` asks: --nproc processes on
    this node (at least one when it is one node of several), static rendezvous over the nodes."""
    per_node = max(cfg.nproc, 1)
    if cfg.nnodes > 1:
        where = [f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}", f"--master-addr={cfg.master_addr}",
                 f"--master-port={cfg.master_port}"]
    else:
        where = ["--standalone"]
    # `-m directpo`: the workers' sys.argv[0] is directpo/__main__.py, which `card.invoked_command_line`
    # recognises, so the model card's "reproduce" line is the workers' command.
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={per_node}",
            "-m", "directpo", *child_argv(argv)]


def launch(cfg, argv: list[str]) -> int:
    """Become torchrun running `directpo *argv` over the processes and nodes `cfg` asks for. Does
    not return on POSIX; elsewhere (no exec that keeps the process) waits for torchrun and returns
    its exit status."""
    cmd = torchrun_command(cfg, argv)
    if os.name != "posix":
        return subprocess.call(cmd)
    sys.stdout.flush()  # exec discards what Python has buffered
    sys.stderr.flush()
    return os.execv(cmd[0], cmd)  # returns only by raising OSError
