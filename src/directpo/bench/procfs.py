"""What the memory checks of `directpo bench` read from Linux's /proc: a process's resident set
and its peak (VmRSS, VmHWM, reset through clear_refs), its environment and command line, its
children, and the machine. Shared by `plan_check` (a probe inside the measured run) and
`fsdp_memory` (a poller outside it)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

MiB = 1 << 20


class MeasureError(UserError, RuntimeError):
    """A measured command failed: a one-line error (with its log's tail) for the CLI."""


_STATUS_RE = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)\s*kB", re.MULTILINE)


def parse_status(text: str) -> dict[str, int]:
    """The memory lines of a /proc/<pid>/status text, in bytes ({} for a process that has exited
    into a zombie, whose status has no Vm lines)."""
    return {k: int(v) * 1024 for k, v in _STATUS_RE.findall(text)}


def read_status(pid: int | str = "self") -> dict[str, int]:
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except (OSError, UnicodeDecodeError):
        return {}


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def parse_environ(raw: bytes) -> dict[str, str]:
    """A /proc/<pid>/environ blob as a dict."""
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it (parents read from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def identify(pid: int, cmdline: str | None = None) -> dict:
    """What a process of the tree is: its command line, and its rank (RANK= in its environment) when
    it is a torchrun worker."""
    cmdline = _cmdline(pid) if cmdline is None else cmdline
    try:
        env = parse_environ(Path(f"/proc/{pid}/environ").read_bytes())
    except OSError:
        env = {}
    if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
        role = "torchrun"
    elif "directpo" in cmdline:
        role = f"rank {env['RANK']}" if "RANK" in env else "launcher" if "--nproc" in cmdline else "process"
    else:
        role = "other"
    return {"cmdline": cmdline[:300], "role": role}


def machine() -> dict:
    """The platform, the CPU count, and what decides bf16 speed (`precision.cpu_identity`)."""
    import platform

    from ..precision import cpu_identity

    return {"platform": platform.platform(), "cpus": os.cpu_count(), **cpu_identity()}
