"""`directpo bench --fsdp-memory`: each rank's peak host memory during an FSDP run, by phase.

`directpo train --nproc 2 --fsdp --max-steps 2 --save-every 1 --checkpoint-format F` and the
same run in one process, each started as a command and watched from outside: every ~50 ms the
harness walks the process tree under the command and reads /proc/<pid>/status (VmHWM, kept per
process: the last value read before it exits; after each read the peak is reset to the current
RSS, so each reading is the peak since the previous one and the peaks can be split by phase at
the command's log lines) and /proc/<pid>/environ (RANK= names a torchrun worker). The harness
only launches commands, so it measures any checkout of the code: `--pythonpath DIR` puts DIR
first on the measured commands' PYTHONPATH (an old commit's src/).

No version of `directpo train` logs a line between its data summary and the end of its
reference pass, so the measured commands also get a `sitecustomize` on their PYTHONPATH (written
into the work dir, `MARK_HOOK`) that prints three mark lines per process, each with the
process's own wall-clock time and its RSS: `load_begin` at the first call of
directpo.models.load_model or empty_model (after the model class's module is imported: the
process holds torch, transformers, directpo, the tokenizer and the tokenized data, and nothing
of the model), and `reference_begin` / `reference_end` around the first call of
directpo.logprobs.dataset_logps (the reference pass). It only wraps those functions, which every
version has, so it measures any checkout too. The phases (`phase_peaks`) are split at the marks
and the log lines: load (from the start to the reference pass), reference (to the "training"
line: the pass, and whatever precedes the first step), training (to the last "step k/N" line),
and the last checkpoint with the final export. Each rank's baseline is its RSS at its
`load_begin` mark; the table shows each phase's peak and the peak above the baseline.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..console import log
from ..errors import UserValueError
from .procfs import (
    MeasureError,
    MiB,
    _cmdline,
    identify,
    machine,
    process_tree,
    read_status,
    reset_peak,
)

MARK_PREFIX = "[directpo-bench-mark]"
_MARK_RE = re.compile(re.escape(MARK_PREFIX) + r" (\w+) rank=(\S+) t=([\d.]+) rss=(\d+) hwm=(\d+) anon=(\d+) file=(\d+)")

# The measured commands' sitecustomize (see the module docstring): marks the model load and the
# reference pass in every process, by wrapping directpo.models.load_model/empty_model and
# directpo.logprobs.dataset_logps as those modules are imported (before any other module binds them).
MARK_HOOK = r'''# written by directpo.bench.fsdp_memory (directpo bench --fsdp-memory): phase marks, see its docstring
import functools
import importlib.abc
import os
import sys
import time

PREFIX = "@PREFIX@"
_WRAP = {"directpo.models": ("load_model", "empty_model"), "directpo.logprobs": ("dataset_logps",)}
_done = set()


def _mark(name):
    st = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    st[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    sys.stderr.write(f"{PREFIX} {name} rank={os.environ.get('RANK', '-')} t={time.time():.3f} "
                     f"rss={st.get('VmRSS', 0)} hwm={st.get('VmHWM', 0)} anon={st.get('RssAnon', 0)} "
                     f"file={st.get('RssFile', 0)}\n")
    sys.stderr.flush()


def _import_model_class(model):
    try:  # the model class's module is code, not model memory: imported before the baseline
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model))]
    except Exception:
        pass


def _wrapped(name, f):
    @functools.wraps(f)
    def w(*args, **kwargs):
        if name == "dataset_logps":
            first = "reference" not in _done
            _done.add("reference")
            if first:
                _mark("reference_begin")
            try:
                return f(*args, **kwargs)
            finally:
                if first:
                    _mark("reference_end")
        if "load" not in _done:
            _done.add("load")
            _import_model_class(args[0] if args else kwargs.get("name_or_dir"))
            _mark("load_begin")
        return f(*args, **kwargs)
    return w


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WRAP:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, names = spec.loader, _WRAP[fullname]
        run = loader.exec_module

        def exec_module(module):
            run(module)
            for n in names:
                if callable(getattr(module, n, None)):
                    setattr(module, n, _wrapped(n, getattr(module, n)))
        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''.replace("@PREFIX@", MARK_PREFIX)


def write_mark_hook(directory: Path) -> Path:
    """Write `MARK_HOOK` as directory/sitecustomize.py (put `directory` first on the measured
    commands' PYTHONPATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(MARK_HOOK)
    return directory


def parse_marks(lines: list[tuple[float, str]], t0_wall: float) -> list[dict]:
    """The hook's mark lines of a watched run: name, role ("rank R", or "process" outside torchrun),
    time on the run's clock (seconds since the command started, from the process's own clock) and
    the process's RSS (and its anonymous and file-backed parts) at the mark, and its peak since the
    harness's last reading (VmHWM: the poller resets it), in bytes."""
    out = []
    for _, line in lines:
        m = _MARK_RE.search(line)
        if m:
            name, rank, t, rss, hwm, anon, file = m.groups()
            out.append({"mark": name, "role": f"rank {rank}" if rank != "-" else "process",
                        "t": round(float(t) - t0_wall, 3), "rss": int(rss), "hwm": int(hwm), "anon": int(anon),
                        "file": int(file)})
    return out


def watch(cmd: list[str], env: dict, log_path: Path, interval: float = 0.05, bucket: float = 0.1) -> dict:
    """Run `cmd` and poll its process tree every `interval` s. Per process (a pid and command line:
    an exec starts a new record): its peak (VmHWM: the last value read before it exits), and the
    peak of each `bucket` s (VmHWM is reset to the current RSS after every read, where the kernel
    allows, so a reading is the peak since the previous one), with the largest anonymous and
    file-backed parts of RSS read in it (file pages: mapped files such as safetensors, clean and
    reclaimable, yet counted in RSS). The command's output lines are kept
    with the time they appeared, so the peaks can be put beside its phases (loading, steps,
    checkpoints, export). (wait4's ru_maxrss is no check here: it reports the peak since the last
    reset.)"""
    t0, t0_wall = time.perf_counter(), time.time()
    seen: dict[tuple[int, str], dict] = {}
    lines: list[tuple[float, str]] = []
    pending = ""
    tree: list[int] = []
    with open(log_path, "w") as logf, open(log_path, errors="replace") as reader:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        for tick in itertools.count():
            now = time.perf_counter() - t0
            if tick % 10 == 0:  # a new process keeps its peak until its first reading: the tree is walked less often
                tree = process_tree(proc.pid)
            for pid in tree:
                st, cmdline = read_status(pid), _cmdline(pid)
                if "VmHWM" not in st:
                    continue
                reset_peak(pid)
                if (pid, cmdline[:300]) not in seen:
                    seen[(pid, cmdline[:300])] = {"pid": pid, **identify(pid, cmdline), "peak": 0, "series": {},
                                                  "anon": {}, "file": {}, "readings": []}
                rec = seen[(pid, cmdline[:300])]
                rec["peak"] = max(rec["peak"], st["VmHWM"])
                # (time, peak, RSS, anon, file) for the phases (not saved: `coarsen`)
                rec["readings"].append((round(now, 3), st["VmHWM"], st.get("VmRSS", 0), st.get("RssAnon", 0),
                                        st.get("RssFile", 0)))
                key = f"{int(now / bucket) * bucket:.2f}"  # a bucket is put in the phase it starts in: keep it short
                rec["series"][key] = max(rec["series"].get(key, 0), st["VmHWM"])
                for part, field in (("anon", "RssAnon"), ("file", "RssFile")):  # what RSS is now, not a peak
                    rec[part][key] = max(rec[part].get(key, 0), st.get(field, 0))
                rec["last_seen_s"] = round(now, 2)
            pending += reader.read()
            *done, pending = pending.split("\n")
            lines += [(round(now, 2), x) for x in done if x.strip()]
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(interval)
        pending += reader.read()
    lines += [(round(time.perf_counter() - t0, 2), x) for x in pending.split("\n") if x.strip()]
    rc = os.waitstatus_to_exitcode(status)
    return {"command": cmd, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "processes": sorted(seen.values(), key=lambda r: r["pid"]), "marks": parse_marks(lines, t0_wall),
            "log": [(t, x) for t, x in lines if MARK_PREFIX not in x],
            "log_tail": [x for _, x in lines[-15:]] if rc else []}


PHASES = ("load", "reference", "training", "last checkpoint + export")


def phase_bounds(run: dict) -> dict[str, float]:
    """Where the phases of a watched run begin, in seconds on its clock (inf: not seen). reference:
    the first `reference_begin` mark of any process, else the first "reference log-probs" log line
    (a run without the hook: that line ends the pass), else the training line; training: the
    "training <loss>: N steps" line (or the first step line); last checkpoint + export: the last
    "step k/N" line."""
    def first_time(pattern: str, last: bool = False) -> float:
        times = [t for t, line in run["log"] if re.search(pattern, line)]
        return (times[-1] if last else times[0]) if times else math.inf

    training = min(first_time(r"\btraining \S+: \d+ steps"), first_time(r"\bstep \d+/\d+"))
    marks = [m["t"] for m in run.get("marks", []) if m["mark"] == "reference_begin"]
    reference = min(marks) if marks else min(first_time(r"\breference log-probs\b"), training)
    return {"load": 0.0, "reference": min(reference, training), "training": training,
            "last checkpoint + export": first_time(r"\bstep \d+/\d+", last=True)}


def phase_peaks(run: dict, role: str) -> dict[str, int]:
    """The peak of the processes of `role` in each phase (`phase_bounds`): load (the model load, and
    with FSDP the sharding), reference (the reference pass, up to the "training" line), training (to
    the last "step k/N" line: the steps and the checkpoints written after each but the last), and
    the last checkpoint with the final export (after it); 0 for a phase without a reading.

    Each reading (the peak since the previous one, ~50 ms before) counts in the phase in which it
    was made, and a mark's own peak (since the reading before it) in the phase that the mark ends:
    so the reading just after a mark adds at most one interval of the phase before to the phase
    after, and nothing of the phase after is put into the one before. A run saved without its
    readings (`coarsen`) is split by its series, each bucket in the phase in which it starts."""
    bounds = sorted(phase_bounds(run).items(), key=lambda kv: kv[1])

    def phase_at(t: float, before: bool = False) -> str:
        names = [n for n, start in bounds if (start < t if before else start <= t)]
        return names[-1] if names else bounds[0][0]

    out = dict.fromkeys(PHASES, 0)
    for p in run["processes"]:
        if p["role"] != role:
            continue
        points = p.get("readings") or [(float(t), v) for t, v in p["series"].items()]
        for t, peak, *_ in points:
            name = phase_at(t)
            out[name] = max(out[name], peak)
    for m in run.get("marks", []):
        if m["role"] == role and m.get("hwm"):
            name = phase_at(m["t"], before=True)
            out[name] = max(out[name], m["hwm"])
    return out


def phase_parts(run: dict, role: str) -> dict[str, dict[str, int | None]]:
    """Per phase, for the processes of `role` (from the raw readings; {} without them): its RSS at
    the phase's start (load: the baseline, the `load_begin` mark's RSS; another phase: the role's
    own mark there, else the first reading in it) and the largest anonymous and file-backed RSS read
    in it (file: mapped files such as safetensors, page cache that is counted in RSS)."""
    readings = sorted(r for p in run["processes"] if p["role"] == role for r in p.get("readings", []))
    if not readings:
        return {}
    bounds = phase_bounds(run)
    ends = dict(zip(PHASES, [*[bounds[k] for k in PHASES[1:]], math.inf]))
    own = {m["mark"]: m["rss"] for m in run.get("marks", []) if m["role"] == role}
    out = {}
    for name in PHASES:
        inside = [r for r in readings if bounds[name] <= r[0] < ends[name]]
        start = {"load": own.get("load_begin"), "reference": own.get("reference_begin")}.get(name)
        if start is None and name != "load" and inside:
            start = inside[0][2]
        out[name] = {"rss_at_start": start, "anon_max": max((r[3] for r in inside), default=None),
                     "file_max": max((r[4] for r in inside), default=None)}
    return out


def baselines(run: dict) -> dict[str, int]:
    """Each role's RSS at its `load_begin` mark (see the module docstring), in bytes."""
    return {m["role"]: m["rss"] for m in run.get("marks", []) if m["mark"] == "load_begin"}


def coarsen(run: dict, bucket: float = 0.5, max_points: int = 200) -> None:
    """Merge each process's series into `bucket`-second buckets (their maximum), in place, the
    bucket a multiple of `bucket` long enough for at most ~`max_points` buckets over the run: the
    saved JSON stays small; the phase peaks are computed before. The raw readings are dropped."""
    wall = run.get("wall_s") or 0
    bucket *= max(1, math.ceil(wall / (bucket * max_points)))
    for p in run["processes"]:
        p.pop("readings", None)
        for part in ("series", "anon", "file"):
            merged: dict[str, int] = {}
            for t, v in p.get(part, {}).items():
                key = f"{math.floor(float(t) / bucket + 1e-9) * bucket:.1f}"
                merged[key] = max(merged.get(key, 0), v)
            p[part] = merged
    run["series_bucket_s"] = bucket


def peaks_by_role(run: dict) -> dict[str, int]:
    """The largest peak of each role of a watched run (rank 0, rank 1, torchrun, process, ...)."""
    out: dict[str, int] = {}
    for p in run["processes"]:
        out[p["role"]] = max(out.get(p["role"], 0), p["peak"])
    return out


def _code_of(env: dict) -> dict:
    """Which directpo the measured commands import, and whether its train has --checkpoint-format."""
    where = subprocess.run([sys.executable, "-c", "import directpo; print(directpo.__file__)"], env=env, check=False,
                           capture_output=True, text=True)
    helptext = subprocess.run([sys.executable, "-m", "directpo", "train", "--help"], env=env, check=False,
                              capture_output=True, text=True).stdout
    path = where.stdout.strip()
    code = {"directpo": path, "checkpoint_format_flag": "--checkpoint-format" in helptext}
    git = subprocess.run(["git", "-C", str(Path(path).parent), "rev-parse", "HEAD"], check=False, capture_output=True,
                         text=True)
    if git.returncode == 0:
        code["commit"] = git.stdout.strip()
        changed = subprocess.run(["git", "-C", str(Path(path).parent), "diff", "--name-only", "HEAD"], check=False,
                                 capture_output=True, text=True).stdout.split()
        code["uncommitted_changes"] = changed
    return code


def train_command(args, pairs: Path, out: Path, nproc: int, fmt: str | None) -> list[str]:
    """The `directpo train` command line of one --fsdp-memory run (flags every version has)."""
    micro = args.micro_batch or max(1, args.batch // args.nproc)
    cmd = [sys.executable, "-m", "directpo", "train", "--model", args.model, "--data", str(pairs), "--output-dir",
           str(out), "--batch-size", str(args.batch), "--micro-batch-size", str(micro), "--max-length",
           str(args.max_length), "--max-prompt-length", str(args.max_length - 1), "--max-steps", "2",
           "--save-every", "1", "--warmup-steps", "0", "--lr", "1e-6", "--seed", "0", "--precision", "fp32",
           "--ref-cache", "off", "--on-invalid", "skip", "--no-progress", "--overwrite"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--fsdp"]
    if fmt:
        cmd += ["--checkpoint-format", fmt]
    return cmd


def fsdp_memory(args) -> dict:
    """`directpo bench --fsdp-memory`: each rank's peak host memory, sharded run and one process."""
    import shutil

    from .runner import _child_env, prepare_pairs

    if args.nproc < 2:
        raise UserValueError("--fsdp-memory: --nproc must be at least 2 (FSDP shards over several processes)")
    env = _child_env()
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(Path(args.pythonpath).resolve()),
                                                          env.get("PYTHONPATH")) if x)
    code = _code_of(env)
    if args.checkpoint_format == "sharded" and not code["checkpoint_format_flag"]:
        raise UserValueError(f"{code['directpo']}: this directpo has no --checkpoint-format (full checkpoints only); "
                             "measure it with --checkpoint-format full")
    fmt = args.checkpoint_format if code["checkpoint_format_flag"] else None
    work = Path(tempfile.mkdtemp(prefix="directpo-fsdp-memory-"))
    if args.keep_work:
        log(f"work dir (kept): {work}", prefix="bench")
    measured_env = {**env, "PYTHONPATH": os.pathsep.join(x for x in (str(write_mark_hook(work / "hook")),
                                                                     env.get("PYTHONPATH")) if x)}
    runs = {}
    try:
        prepare_pairs(args.data, args.model, args.batch * 2, args.max_length, work / "pairs.jsonl", args.data_split)
        for name, nproc, f in ((f"fsdp {args.nproc} ranks", args.nproc, fmt), ("one process", 1, None)):
            log(f"fsdp memory: {name} ({code['directpo']}) ...", prefix="bench")
            run = watch(train_command(args, work / "pairs.jsonl", work / f"out-{nproc}", nproc, f), measured_env,
                        work / f"{nproc}.log")
            if run["rc"] != 0:
                raise MeasureError(f"{name}: exit status {run['rc']}:\n  " + "\n  ".join(run["log_tail"]))
            run["peaks"] = peaks_by_role(run)
            run["phase_bounds_s"] = {k: v if math.isfinite(v) else None for k, v in phase_bounds(run).items()}
            run["phase_peaks"] = {r: phase_peaks(run, r) for r in run["peaks"] if r.startswith("rank ") or
                                  r == "process"}
            run["baseline"] = baselines(run)
            run["phase_parts"] = {r: phase_parts(run, r) for r in run["phase_peaks"]}
            coarsen(run)
            runs[name] = run
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    settings = {"model": args.model, "data": args.data, "batch": args.batch, "micro_batch": args.micro_batch or
                max(1, args.batch // args.nproc), "max_length": args.max_length, "nproc": args.nproc,
                "checkpoint_format": fmt or "full (the code's only format)", "max_steps": 2, "save_every": 1,
                "threads": args.threads, "pythonpath": args.pythonpath,
                "allocator_env": {k: v for k, v in sorted(os.environ.items())
                                  if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}}
    result = {"settings": settings, "code": code, "machine": machine(), "runs": runs}
    result["table"] = format_fsdp_memory(result)
    return result


def format_fsdp_memory(result: dict) -> str:
    """Per process: its peak, and each phase's peak (MiB), then the same above its baseline."""
    s, code = result["settings"], result["code"]
    sharded, single = result["runs"].values()
    ranks = sorted((r for r in sharded["peaks"] if r.startswith("rank ")), key=lambda r: int(r.split()[1]))
    alloc = ", ".join(f"{k}={v}" for k, v in s.get("allocator_env", {}).items()) or "glibc defaults"
    lines = [(f"peak host memory (VmHWM): {s['model']}, batch {s['batch']}, micro-batch {s['micro_batch']}, "
              f"max_length {s['max_length']}, 2 steps, a checkpoint after each, format {s['checkpoint_format']}; "
              f"{alloc}"),
             f"code: {code['directpo']}" + (f" (commit {code['commit'][:8]}"
                                             f"{', uncommitted changes' if code.get('uncommitted_changes') else ''})"
                                             if code.get("commit") else ""), ""]
    rows = [(f"FSDP {s['nproc']} ranks, {r}", sharded, r) for r in ranks] + [("one process", single, "process")]
    head = f"{'peak':>8}{'load':>8}{'reference':>11}{'training':>10}{'last ckpt + export':>20}"
    for title, minus in (("MiB", False), ("MiB above the baseline", True),
                         ("MiB rise (peak - RSS at its start)", None)):
        lines.append(f"  {title:<36}{head}" + (f"{'baseline':>10}" if minus else ""))
        for label, run, role in rows:
            ph, base = run.get("phase_peaks", {}).get(role, {}), run.get("baseline", {}).get(role)
            parts = run.get("phase_parts", {}).get(role, {})
            if minus and base is None:
                lines.append(f"  {label:<36}  (no load_begin mark)")
                continue
            vals = [run["peaks"].get(role, 0)] + [ph.get(k, 0) for k in PHASES]
            offs = [base if minus else 0] * 5 if minus is not None else \
                [None] + [parts.get(k, {}).get("rss_at_start") for k in PHASES]
            cells = [f"{(v - o) / MiB:.0f}" if v and o is not None else "-" for v, o in zip(vals, offs)]
            lines.append(f"  {label:<36}{cells[0]:>8}{cells[1]:>8}{cells[2]:>11}{cells[3]:>10}{cells[4]:>20}"
                         + (f"{base / MiB:10.0f}" if minus else ""))
        lines.append("")
    lines.append(f"  {'FSDP torchrun agent':<36}{sharded['peaks'].get('torchrun', 0) / MiB:8.0f}")
    if ranks and single["peaks"].get("process"):
        lines.append(f"  rank 0 / one process: {sharded['peaks'][ranks[0]] / single['peaks']['process']:.2f}")
    return "\n".join(lines)
