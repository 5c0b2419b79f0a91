"""`directpo bench --wall-time --before REV`: the user's sampling-bound commands, an older tree's
code against this checkout's, in one run.

    directpo bench --wall-time --before 080cef2 --model M --data PROMPTS [--rounds 3]
                   [--wall-commands online,sentiment-stage] [--wall-scale 1] [--wall-corpus FILE] [--threads N]
                   [--out results.json]

The trees
    "after" is the code this process runs (this checkout's src/, uncommitted edits included:
    recorded as `dirty`); "before" is commit REV of the same repository, checked out for the run in
    a temporary `git worktree` (`bench/trees.py`) and removed afterwards, also when a command fails.
    Every command is `python -m directpo ...` in its own process with PYTHONPATH = that tree's src/
    alone: the same interpreter and libraries on both sides, only directpo's code differs (checked
    before the first run: each tree's interpreter must import its own directpo). Each run writes into
    a fresh output folder; all run from this checkout's top folder (where a user starts the study, and
    where the study finds the SST corpus shipped beside the checkout, unless --wall-corpus).

What is timed (flags both trees accept: `online` and `experiment sentiment` have them since before
issue #32's sampler work; prompt counts × --wall-scale, default 1)
    online           `directpo online --rounds 2` from --model on the first 32 prompts of --data,
                     8 samples per prompt (≤ 32 new tokens), best-vs-worst pairs by VADER (the
                     sentiment study's ground truth, `directpo.eval.scorers:vader_sentiment`: no
                     download), 2 DPO steps of 16 pairs a round, each round evaluated on 2 samples
                     per prompt with its KL (round 0 too). Sampling is most of each round: it stands
                     for what `online` rounds cost a user.
    sentiment-stage  `directpo experiment sentiment --preset cpu-small` with --model as πSFT
                     (`--base-model`, so no pretraining) and `--methods best_of_n`: the study's
                     corpus and prompt stages, its preference pairs (64 train prompts × 4 samples,
                     as the study draws them), a 5-step reward model (what Best-of-N needs; training,
                     not sampling, so kept short), πSFT's evaluation point (64 eval prompts × 4
                     samples and the KL forward) and Best-of-N (64 × 16 samples of πSFT, scored by the
                     RM and VADER): the cpu-small study's sampling stages at its own settings
                     (≤ 32 new tokens, eval batch 256, fp32, seed 0) on a quarter of its eval prompts
                     and a twenty-third of its train prompts, so that 3 rounds of both commands on
                     both trees fit about a quarter of an hour on 2 CPU cores. The study's pairs,
                     evaluations and Best-of-N are where the committed study samples; its training
                     runs are not timed here (the sampler does not touch them).

How it is measured
    Round r runs every command once per tree, alternating (who goes first swaps each round).
    Wall time is from just before the process starts to its exit; peak RSS and CPU seconds are the
    child's own (`os.wait4`'s rusage: ru_maxrss, user + system). Phases come from the command's own
    records: online's per-stage seconds (round-R/pairs|train|eval.done.json, summed over rounds),
    the study's per-stage clock (summary.json `timings_s`); "other" is the rest of the wall time
    (interpreter start, imports, exit). Figures are medians over rounds; every run is kept in the
    JSON with both revisions' full hashes, the machine and the library versions.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..console import log
from ..errors import UserValueError
from . import trees
from .report import DASH, fmt

WALL_COMMANDS = ("online", "sentiment-stage")
TREES = ("before", "after")
ONLINE_PROMPTS = 32          # × --wall-scale
SENTIMENT_EVAL_PROMPTS = 64  # × --wall-scale
ONLINE_FLAGS = ("--rounds", "2", "--samples-per-prompt", "8", "--max-new-tokens", "32", "--sample-batch-size", "32",
                "--eval-samples", "2", "--batch-size", "16", "--micro-batch-size", "8", "--max-length", "256",
                "--reward-fn", "directpo.eval.scorers:vader_sentiment", "--seed", "0", "--no-progress")
SENTIMENT_FLAGS = ("--preset", "cpu-small", "--methods", "best_of_n", "--n-train-prompts", "64", "--eval-samples", "4",
                   "--bon-ns", "2,4,8,16", "--rm-steps", "5", "--dpo-cover", "0", "--seed", "0", "--no-progress")


def scaled(base: int, cfg, least: int) -> int:
    """A prompt count times --wall-scale (at least `least`)."""
    return max(least, round(base * float(getattr(cfg, "wall_scale", 1.0))))


def parse_commands(s: str) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in str(s).split(",") if x.strip()))
    unknown = [x for x in names if x not in WALL_COMMANDS]
    if unknown or not names:
        raise UserValueError(f"--wall-commands {s}: expected a comma-separated list of {', '.join(WALL_COMMANDS)}")
    return names


def command_argv(name: str, cfg, inputs: dict, out: Path) -> list[str]:
    """The command's arguments after `python -m directpo` (the same for both trees)."""
    if name == "online":
        argv = ["online", "--model", cfg.model, "--prompts", str(inputs["prompts"]), "--output-dir", str(out),
                *ONLINE_FLAGS]
    else:
        argv = ["experiment", "sentiment", "--output-dir", str(out), "--base-model", cfg.model, *SENTIMENT_FLAGS,
                "--n-eval-prompts", str(scaled(SENTIMENT_EVAL_PROMPTS, cfg, 8))]
        if cfg.wall_corpus:
            argv += ["--corpus", cfg.wall_corpus]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    if cfg.device:
        argv += ["--device", cfg.device]
    return argv


def command_phases(name: str, out: Path) -> dict[str, float]:
    """Seconds per stage as the command recorded them (empty when it recorded none)."""
    if name == "online":
        phases = {"sample+pair": 0.0, "train": 0.0, "evaluate": 0.0}
        for record, phase in (("pairs.done.json", "sample+pair"), ("train.done.json", "train"),
                              ("eval.done.json", "evaluate")):
            for path in out.glob(f"round-*/{record}"):
                phases[phase] += float(json.loads(path.read_text()).get("seconds") or 0.0)
        return phases if any(phases.values()) else {}
    summary = out / "summary.json"
    if not summary.exists():
        return {}
    return {k: float(v) for k, v in (json.loads(summary.read_text()).get("timings_s") or {}).items()}


def online_prompts(cfg, path: Path) -> Path:
    """The first ONLINE_PROMPTS × --wall-scale prompts of --data as a prompt file both trees read."""
    from ..data.prompts import load_prompts
    from ..data.readers import write_jsonl

    n = scaled(ONLINE_PROMPTS, cfg, 2)
    items = load_prompts(cfg.data, on_invalid="skip", split=cfg.data_split)
    if len(items) < n:
        raise UserValueError(f"{cfg.data}: {len(items)} usable prompts, --wall-time's online command needs {n} "
                             "(lower --wall-scale)")
    write_jsonl(({"prompt": it.prompt} for it in items[:n]), path)
    return path


def run_command(argv: list[str], env: dict, cwd: Path, log_path: Path) -> dict:
    """`python -m directpo ARGV` in its own process: wall seconds, and the child's own peak RSS and
    CPU seconds (from `os.wait4`, which reports that child alone); an error with the log's tail."""
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "directpo", *argv], stdout=logf, stderr=subprocess.STDOUT,
                                env=env, cwd=str(cwd))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    run = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
           "exit_status": rc}
    if rc != 0:
        run["error"] = f"exit status {rc}"
        run["log_tail"] = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    return run


def run_one(name: str, tree: trees.Tree, cfg, ctx: dict, tag: str) -> dict:
    """One command of one tree in a fresh output folder (removed afterwards unless --keep-work)."""
    work = ctx["work"]
    out = work / f"{tag}-out"
    run = run_command(command_argv(name, cfg, ctx["inputs"], out), tree.env(ctx["env"]), ctx["cwd"],
                      work / f"{tag}.log")
    if "error" not in run:
        phases = command_phases(name, out)
        if phases:
            phases["other"] = max(0.0, run["wall_s"] - sum(phases.values()))
        run["phases"] = phases
    if not cfg.keep_work:
        shutil.rmtree(out, ignore_errors=True)
    return run


def run_rounds(cfg, commands: list[str], tree_of: dict, ctx: dict) -> list[dict]:
    runs = []
    for r in range(cfg.rounds):
        for name in commands:
            for label in (TREES if r % 2 == 0 else TREES[::-1]):  # who goes first swaps each round
                log(f"round {r + 1}/{cfg.rounds}: {name}, {label} ({tree_of[label].commit[:10]}) ...", prefix="bench")
                run = {"round": r + 1, "command": name, "tree": label,
                       **run_one(name, tree_of[label], cfg, ctx, f"r{r}-{name}-{label}")}
                runs.append(run)
                log(f"round {r + 1}: {name}, {label}: " + (
                    f"FAILED ({run['error']}):\n  " + "\n  ".join(run["log_tail"]) if "error" in run else
                    f"{run['wall_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB"), prefix="bench")
    return runs


def _median_side(ok: list[dict]) -> dict:
    side = {"rounds_ok": len(ok)}
    if ok:
        for f in ("wall_s", "peak_rss_mib", "cpu_s"):
            side[f] = statistics.median(x[f] for x in ok)
        names = dict.fromkeys(p for x in ok for p in x.get("phases", {}))
        side["phases"] = {p: statistics.median(x["phases"].get(p, 0.0) for x in ok) for p in names}
    return side


def summarize(runs: list[dict], commands: list[str]) -> list[dict]:
    """Per command: each tree's medians over its rounds that ran, and before / after of the medians."""
    out = []
    for name in commands:
        row: dict = {"command": name}
        for label in TREES:
            mine = [x for x in runs if x["command"] == name and x["tree"] == label]
            row[label] = _median_side([x for x in mine if "error" not in x])
            row[label]["rounds_failed"] = len(mine) - row[label]["rounds_ok"]
        b, a = row["before"], row["after"]
        row["ratio"] = b["wall_s"] / a["wall_s"] if b["rounds_ok"] and a["rounds_ok"] else None
        out.append(row)
    return out


def format_table(result: dict) -> str:
    """The markdown table: whole-command wall time per tree and the ratio, then the phases."""
    rev, s = result["revisions"], result["settings"]
    dirty = " + uncommitted edits" if rev["after"]["dirty"] else ""
    lines = [f"directpo bench --wall-time: before {rev['before']['commit'][:10]} ({rev['before']['rev']}), after "
             f"{rev['after']['commit'][:10]}{dirty}; --model {s['model']}, {s['rounds']} round(s), alternating, "
             f"medians; {result['machine'].get('device_name')}", "",
             "| command | before s | after s | before/after | peak RSS MiB before | peak RSS MiB after "
             "| CPU s before | CPU s after |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    row = lambda *cells: "| " + " | ".join(c if isinstance(c, str) else fmt(*c, DASH) for c in cells) + " |"  # noqa: E731
    for r in result["results"]:
        b, a = r["before"], r["after"]
        lines.append(row(r["command"], (b.get("wall_s"), ".1f"), (a.get("wall_s"), ".1f"), (r["ratio"], ".2f"),
                         (b.get("peak_rss_mib"), ".0f"), (a.get("peak_rss_mib"), ".0f"), (b.get("cpu_s"), ".1f"),
                         (a.get("cpu_s"), ".1f")))
    lines += ["", "| command | phase | before s | after s | before/after |", "| --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        b, a = r["before"].get("phases") or {}, r["after"].get("phases") or {}
        for p in dict.fromkeys([*b, *a]):
            ratio = b[p] / a[p] if b.get(p) and a.get(p) else None
            lines.append(row(r["command"], p, (b.get(p), ".1f"), (a.get(p), ".1f"), (ratio, ".2f")))
    failed = [f"{r['command']} {t}: {r[t]['rounds_failed']}" for r in result["results"] for t in TREES
              if r[t]["rounds_failed"]]
    if failed:
        lines += ["", "Failed rounds (see runs[].log_tail): " + ", ".join(failed)]
    return "\n".join(lines)


def _check(cfg) -> list[str]:
    """The commands; what `BenchConfig.validate` leaves to this mode (--before, --model and --data it checks)."""
    if cfg.rounds < 1:
        raise UserValueError(f"--rounds {cfg.rounds}: --wall-time needs at least one round")
    return parse_commands(cfg.wall_commands)


def wall_time(cfg) -> dict:
    """Every round's runs, the medians per command and tree, the ratios and the table, as one JSON-able dict."""
    commands = _check(cfg)
    src = trees.package_src()
    top = trees.repo_top(src)
    before_commit = trees.resolve(top, cfg.before)
    after = trees.after_tree(top, src)
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-wall-"))
    try:
        inputs = {"prompts": online_prompts(cfg, work / "online-prompts.jsonl")} if "online" in commands else {}
        with trees.before_tree(top, cfg.before, before_commit, work,
                               Path(os.path.realpath(src)).relative_to(os.path.realpath(top))) as before:
            from .runner import _child_env

            ctx = {"work": work, "inputs": inputs, "env": _child_env(), "cwd": top}
            tree_of = {"before": before, "after": after}
            for tree in tree_of.values():
                trees.check_imports(tree, ctx["env"])
            log(f"{len(commands)} command(s) × 2 trees × {cfg.rounds} round(s): before {before.commit[:10]}, "
                f"after {after.commit[:10]}{' (dirty)' if after.dirty else ''}", prefix="bench")
            runs = run_rounds(cfg, commands, tree_of, ctx)
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return _result(cfg, commands, runs, tree_of, inputs)


def _result(cfg, commands: list[str], runs: list[dict], tree_of: dict, inputs: dict) -> dict:
    from .. import __version__
    from ..models import pick_device
    from .runner import _machine, _versions

    argv = {name: command_argv(name, cfg, inputs, Path("OUT")) for name in commands}
    out = {"directpo_version": __version__, "versions": _versions(), "machine": _machine(pick_device(cfg.device)),
           "revisions": {label: {"rev": t.rev, "commit": t.commit, "dirty": t.dirty} for label, t in tree_of.items()},
           "settings": {"model": cfg.model, "data": cfg.data, "rounds": cfg.rounds, "commands": commands,
                        "threads": cfg.threads, "device": cfg.device, "corpus": cfg.wall_corpus,
                        "scale": cfg.wall_scale, "online_prompts": scaled(ONLINE_PROMPTS, cfg, 2) if inputs else None,
                        "sentiment_eval_prompts": scaled(SENTIMENT_EVAL_PROMPTS, cfg, 8)},
           "argv": argv, "results": summarize(runs, commands), "runs": runs}
    out["table"] = format_table(out)
    return out
