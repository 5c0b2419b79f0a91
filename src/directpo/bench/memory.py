"""Memory checks of `directpo bench`: the plan's formulas against a measured run (`--plan-check`),
and each rank's peak host memory during an FSDP run (`--fsdp-memory`).

--plan-check
    One directpo training run on the CPU (fp32, one process, the bench's pairs, the optimizer and
    LoRA rank asked for) in its own interpreter, `python -m directpo.bench.memory --child SPEC`.
    Inside it a probe marks the phases of the run: the model load, the reference pass, and per
    optimizer step its forward/backward and its optimizer step. At each mark it records the resident
    set (VmRSS) and the peak since the previous mark (VmHWM, then reset to the current RSS by writing
    5 to /proc/self/clear_refs, so each phase has a peak of its own).

    The baseline is the RSS *inside the training process, just before the model is loaded*: torch,
    transformers, directpo and the model class's module are imported, the tokenizer and the pairs
    are loaded and tokenized, nothing of the model exists yet. Measured memory is RSS above that
    baseline. This is cleaner than a second "the same but without the model" process: the same
    interpreter, the same imported modules and the same data objects are on both sides of the
    difference, so no import (a lazily imported module shows up as tens of MiB) or run-to-run
    variation of shared-library pages enters it; and nothing is patched in the package (the probe
    wraps `load_model` and uses torch's global optimizer-step hooks from outside). What it cannot
    see: memory freed before the baseline but kept by the C allocator, later reused by the model
    (it makes the measured figure smaller, never larger).

    Predicted is `directpo plan`'s arithmetic (`memory_plan` with nproc 1, fp32, the optimizer and
    LoRA rank of the run): weights + gradients + optimizer state + activations + the reference
    (precomputed: a table of 4 bytes per response). The plan assumes every micro-batch holds
    2·m·max_length tokens (its bound); real pairs are shorter, so the activations are the plan's
    per-token formula at the tokens each micro-batch really had (counted at the embedding), the
    bound shown beside it. Per component: weights = RSS growth over the model load; gradients and
    optimizer state = RSS growth over the first backward and the first optimizer step (and the exact
    bytes of `.grad` and `optimizer.state`); activations + gradients = a step's forward/backward
    peak above the RSS at its start (the gradients are freed after every step and made again in the
    backward); total = the peak RSS over training above the baseline.

--fsdp-memory
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
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..console import log

MiB = 1 << 20


class MeasureError(RuntimeError):
    """A measured command failed: a one-line error (with its log's tail) for the CLI."""

    user_error = True
_STATUS_RE = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)\s*kB", re.MULTILINE)


# ------------------------------------------------------------------------------------------------
# /proc


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


# ------------------------------------------------------------------------------------------------
# --plan-check: inside the measured process


class Probe:
    """Phase marks inside the measured process: at each mark the RSS now and the peak RSS since the
    previous mark (the peak is then reset, so the next phase's peak is its own)."""

    def __init__(self):
        self.marks: list[dict] = []
        self.resettable = reset_peak()

    def mark(self, name: str, **extra) -> None:
        st = read_status()
        self.marks.append({"mark": name, "rss": st.get("VmRSS"), "peak": st.get("VmHWM"),
                           "rss_anon": st.get("RssAnon"), "rss_file": st.get("RssFile"), "t": time.time(), **extra})
        reset_peak()


def _import_model_class(model: str) -> None:
    """Import the model class's module before the baseline (its code is not model memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    AutoModelForCausalLM._model_mapping[type(config)]  # the lazy mapping imports the module


def _tensor_bytes(tensors) -> int:
    import torch

    return sum(t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t))


def instrument(probe: Probe, model: str) -> dict:
    """Wrap directpo's `load_model` (in every module that imported it) and `label_logprobs`, and hook
    torch's optimizer steps, so the probe marks: load_begin/load_end around the policy's load (its
    mapped weights read in), step_begin at the first forward with gradients of each step (the
    embedding's input: tokens per micro-batch; the LM head's input: label rows),
    optimizer_begin/optimizer_end around each optimizer step. Returns the shared state."""
    import torch
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    from .. import logprobs, models
    from ..train import loop  # noqa: F401 (its imports bind load_model before the wrap replaces it)

    original, original_head = models.load_model, logprobs.label_logprobs
    state: dict = {"loaded": False, "in_step": False, "step": 0, "tokens": [], "label_rows": []}

    def on_forward(module, args):
        if not torch.is_grad_enabled():  # the reference pass, evaluation
            return
        if not state["in_step"]:
            state["in_step"], state["step"] = True, state["step"] + 1
            state["tokens"].append([])
            state["label_rows"].append([])
            probe.mark("step_begin", step=state["step"])
        state["tokens"][-1].append(int(args[0].numel()))

    def label_logprobs(hidden, *args, **kwargs):
        if torch.is_grad_enabled() and state["in_step"]:
            state["label_rows"][-1].append(int(hidden.shape[0]))
        return original_head(hidden, *args, **kwargs)

    def load_model(*args, **kwargs):
        if state["loaded"] or kwargs.get("empty"):
            return original(*args, **kwargs)
        _import_model_class(model)
        probe.mark("load_begin")
        policy = original(*args, **kwargs)
        state["loaded"] = True
        with torch.no_grad():  # safetensors files are mapped: read every page now (the first forward would)
            for p in policy.parameters():
                p.sum()
        probe.mark("load_end", param_bytes=_tensor_bytes(policy.parameters()))
        policy.get_input_embeddings().register_forward_pre_hook(on_forward)
        return policy

    def pre_step(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        probe.mark("optimizer_begin", step=state["step"], grad_bytes=_tensor_bytes(grads))

    def post_step(opt, args, kwargs):
        states = [t for s in opt.state.values() for t in s.values()]
        probe.mark("optimizer_end", step=state["step"], state_bytes=_tensor_bytes(states),
                   trainable=sum(p.numel() for g in opt.param_groups for p in g["params"]))
        state["in_step"] = False

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("directpo") and getattr(mod, "load_model", None) is original:
            mod.load_model = load_model
    logprobs.label_logprobs = label_logprobs
    register_optimizer_step_pre_hook(pre_step)
    register_optimizer_step_post_hook(post_step)
    return state


def plan_check_child(spec_path: str) -> int:
    """The measured training run of --plan-check (see the module docstring)."""
    from dataclasses import replace

    from ..train.loop import train
    from .child import directpo_train_config

    spec = json.loads(Path(spec_path).read_text())
    probe = Probe()
    probe.mark("start")
    state = instrument(probe, spec["model"])
    cfg = replace(directpo_train_config(spec), optimizer=spec["optimizer"], lora_r=spec.get("lora_r") or 0)
    train(cfg)
    probe.mark("end")
    Path(spec["result"]).write_text(json.dumps({"marks": probe.marks, "resettable": probe.resettable,
                                                "tokens": state["tokens"], "label_rows": state["label_rows"]}))
    return 0


# ------------------------------------------------------------------------------------------------
# --plan-check: the comparison


def phases(marks: list[dict]) -> dict:
    """Measured figures (bytes above the baseline) from the child's marks; see the module docstring."""
    by = {}
    for m in marks:
        by.setdefault(m["mark"], []).append(m)
    base = by["load_begin"][0]["rss"]
    begins, opt_begins, opt_ends = by.get("step_begin", []), by.get("optimizer_begin", []), by.get("optimizer_end", [])
    steps = []
    for b, ob, oe in zip(begins, opt_begins, opt_ends):
        steps.append({"step": b["step"], "rss_start": b["rss"] - base, "fwd_bwd_peak": ob["peak"] - b["rss"],
                      "after_backward": ob["rss"] - b["rss"], "optimizer_growth": oe["rss"] - ob["rss"],
                      "optimizer_peak": oe["peak"] - base, "grad_bytes": ob["grad_bytes"],
                      "state_bytes": oe["state_bytes"], "peak": max(ob["peak"], oe["peak"]) - base})
    load_end = by["load_end"][0]
    training = [m for m in marks if m["mark"] in ("load_end", "step_begin", "optimizer_begin", "optimizer_end")]
    return {"baseline_rss": base, "weights": load_end["rss"] - base, "load_peak": load_end["peak"] - base,
            "param_bytes": load_end["param_bytes"],
            "reference_pass_peak": begins[0]["peak"] - base if begins else None,
            "gradients": steps[0]["after_backward"] if steps else None,
            "optimizer": steps[0]["optimizer_growth"] if steps else None,
            "steps": steps, "training_peak": max(m["peak"] for m in training) - base,
            "final_save_peak": by["end"][0]["peak"] - base if "end" in by else None}


def head_as_run(shape, pcfg, rows: int) -> int:
    """`plan.head_bytes` at the label rows a micro-batch really sent through the LM head: the plan
    counts one whole 32 MiB chunk of logits (its bound; the backward builds each chunk's gradient in
    place); a micro-batch of fewer rows than a chunk holds a chunk of its own rows only."""
    from ..train.plan import HEAD_BACKWARD_CHUNKS, HEAD_CHUNK_BYTES, head_bytes

    chunk_rows = max(16, HEAD_CHUNK_BYTES // 4 // max(shape.vocab, 1))
    chunks = HEAD_BACKWARD_CHUNKS * HEAD_CHUNK_BYTES
    logits = HEAD_BACKWARD_CHUNKS * 4 * min(rows, chunk_rows) * shape.vocab
    return head_bytes(shape, pcfg) - chunks + logits


def predicted(shape, pcfg, tokens: list[list[int]], pairs: int, label_rows: list[list[int]] | None = None) -> dict:
    """The plan's figures for the run as it ran: `memory_plan` of `pcfg`, its activations at each
    step's largest micro-batch (tokens counted in the run; the LM head's part at its label rows when
    they were counted), and at the bound 2·m·max_length."""
    from ..train.plan import activation_bytes, head_bytes, memory_plan

    plan = memory_plan(shape, pcfg)
    parts = plan["parts"]
    head = head_bytes(shape, pcfg)
    per_token = (activation_bytes(shape, pcfg, 1) - head) / (2 * pcfg.max_length)
    rows = label_rows if label_rows and all(label_rows) else None
    acts = [per_token * max(t) + (head_as_run(shape, pcfg, max(rows[k])) if rows else head)
            for k, t in enumerate(tokens) if t]
    fixed = sum(v for k, v in parts.items() if k not in ("optimizer", "activations")) + 8 * pairs  # + the table
    # step 1's forward/backward runs before the optimizer state exists (it is made by its first step)
    totals = [fixed + a + (parts["optimizer"] if k else 0) for k, a in enumerate(acts)]
    return {"plan": plan, "weights": parts["weights"], "gradients": parts["gradients"],
            "optimizer": parts["optimizer"], "reference_table": 8 * pairs, "activations_per_token": per_token,
            "activations_head_bound": head, "activations_by_step": acts,
            "max_tokens_by_step": [max(t) if t else 0 for t in tokens],
            "max_label_rows_by_step": [max(r) if r else 0 for r in rows] if rows else None,
            "total": max(totals) if totals else None, "total_bound": plan["total"]}


def ratio(measured: float | None, expected: float | None) -> float | None:
    """measured / expected, None where either is missing or the expectation is 0."""
    if measured is None or not expected:
        return None
    return measured / expected


def compare(meas: dict, pred: dict) -> list[dict]:
    """Rows of (component, measured, predicted, ratio); the activation row is the step whose
    forward/backward peak is largest against its prediction (steps ≥ 2: the optimizer state exists)."""
    rows = [{"component": "weights (RSS over the load)", "measured": meas["weights"], "predicted": pred["weights"]},
            {"component": "weights (parameter tensors)", "measured": meas["param_bytes"], "predicted": pred["weights"]},
            {"component": "gradients (RSS over the 1st backward)", "measured": meas["gradients"],
             "predicted": pred["gradients"]}]
    if meas["steps"]:
        rows.append({"component": "gradients (.grad tensors)", "measured": meas["steps"][0]["grad_bytes"],
                     "predicted": pred["gradients"]})
        rows += [{"component": "optimizer (RSS over the 1st step)", "measured": meas["optimizer"],
                  "predicted": pred["optimizer"]},
                 {"component": "optimizer (state tensors)", "measured": meas["steps"][0]["state_bytes"],
                  "predicted": pred["optimizer"]}]
    for s, act in zip(meas["steps"], pred["activations_by_step"]):
        s["predicted_fwd_bwd"] = act + pred["gradients"]
        s["ratio"] = ratio(s["fwd_bwd_peak"], s["predicted_fwd_bwd"])
    later = [s for s in meas["steps"] if s["step"] > 1] or meas["steps"]
    if later:
        s = max(later, key=lambda x: x["fwd_bwd_peak"])
        rows.append({"component": f"activations + gradients (step {s['step']}, "
                                  f"{pred['max_tokens_by_step'][s['step'] - 1]} tokens)",
                     "measured": s["fwd_bwd_peak"], "predicted": s["predicted_fwd_bwd"]})
    rows.append({"component": "total (training peak)", "measured": meas["training_peak"], "predicted": pred["total"]})
    rows.append({"component": "total vs the plan's bound (2·m·max_length)", "measured": meas["training_peak"],
                 "predicted": pred["total_bound"]})
    for r in rows:
        r["ratio"] = ratio(r["measured"], r["predicted"])
    return rows


ALLOCATORS = {  # --allocator: the C allocator settings of the measured run
    "glibc": {},  # as a user runs it: freed memory below the (dynamic) mmap threshold stays in the heap
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"},  # every block ≥ 64 KiB its own mapping, returned when freed
}


def format_plan_check(result: dict) -> str:
    s, runs = result["settings"], result["runs"]
    names = list(runs)
    base = runs[names[0]]["measured"]["baseline_rss"]
    lines = [f"plan check: {s['model']}, batch {s['batch']}, micro-batch {s['micro_batch']}, max_length "
             f"{s['max_length']}, {s['optimizer']}" + (f", LoRA r={s['lora_r']}" if s["lora_r"] else "") +
             f", fp32, CPU, {s['steps']} steps; MiB above the RSS before the model load ({base / MiB:.0f} MiB)",
             "measured with the C allocator " + " and ".join(
                 f"'{n}'" + (f" ({' '.join(f'{k}={v}' for k, v in ALLOCATORS[n].items())})" if ALLOCATORS[n] else
                             " (its defaults)") for n in names), "",
             f"  {'component':<52}{'plan':>9}" + "".join(f"{n:>10}{'ratio':>7}" for n in names)]
    for k, row in enumerate(runs[names[0]]["rows"]):
        line = f"  {row['component']:<52}{row['predicted'] / MiB:>9.1f}"
        for n in names:
            r = runs[n]["rows"][k]
            rat = f"{r['ratio']:.2f}" if r["ratio"] is not None and math.isfinite(r["ratio"]) else "-"
            line += (f"{r['measured'] / MiB:>10.1f}" if r["measured"] is not None else f"{'-':>10}") + f"{rat:>7}"
        lines.append(line)
    lines.append("")
    for n in names:
        m = runs[n]["measured"]
        lines.append(f"  {n}: reference pass peak {(m['reference_pass_peak'] or 0) / MiB:.1f} MiB, final save peak "
                     f"{(m['final_save_peak'] or 0) / MiB:.1f} MiB (not in the plan)")
    return "\n".join(lines)


def _run_child(spec: dict, work: Path, tag: str, env_extra: dict | None = None) -> dict:
    """Run `python -m directpo.bench.memory --child SPEC` (see `runner.run_child`)."""
    from .runner import _child_env

    spec_path, result_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    with open(log_path, "w") as logf:
        rc = subprocess.run([sys.executable, "-m", "directpo.bench.memory", "--child", str(spec_path)], check=False,
                            stdout=logf, stderr=subprocess.STDOUT, env={**_child_env(), **(env_extra or {})}).returncode
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise MeasureError(f"the measured run failed (exit status {rc}):\n  " + "\n  ".join(tail))
    return json.loads(result_path.read_text())


def plan_check(args) -> dict:
    """`directpo bench --plan-check`: the plan against measured training runs (module docstring)."""
    import shutil

    from ..train.plan import PlanConfig, model_shape
    from .runner import prepare_pairs

    mb = args.micro_batch or args.batch
    pcfg = PlanConfig(model=args.model, nproc=1, batch_size=args.batch, micro_batch_size=mb,
                      max_length=args.max_length, precision="fp32", optimizer=args.optimizer,
                      lora_r=args.lora_r).validate()
    n = args.batch * (args.steps + 1)
    allocators = ["mmap", "glibc"] if args.allocator == "both" else [args.allocator]
    work = Path(tempfile.mkdtemp(prefix="directpo-plan-check-"))
    raw = {}
    try:
        prepare_pairs(args.data, args.model, n, args.max_length, work / "pairs.jsonl", args.data_split)
        spec = {"model": args.model, "data": str(work / "pairs.jsonl"), "batch": args.batch, "micro_batch": mb,
                "steps": args.steps, "max_length": args.max_length, "threads": args.threads, "device": "cpu",
                "precision": "fp32", "optimizer": args.optimizer, "lora_r": args.lora_r}
        for a in allocators:
            log(f"plan check: training {args.steps + 1} steps of {args.batch} pairs in a child process, "
                f"allocator {a} ...", prefix="bench")
            raw[a] = _run_child({**spec, "output_dir": str(work / f"run-{a}")}, work, f"plan-check-{a}",
                                ALLOCATORS[a])
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    first = raw[allocators[0]]
    pred = predicted(model_shape(args.model), pcfg, first["tokens"], n, first.get("label_rows"))
    runs = {}
    for a in allocators:
        meas = phases(raw[a]["marks"])
        runs[a] = {"env": ALLOCATORS[a], "measured": meas, "rows": compare(meas, pred), "marks": raw[a]["marks"],
                   "tokens": raw[a]["tokens"], "label_rows": raw[a].get("label_rows"),
                   "peak_resettable": raw[a]["resettable"]}
    settings = {"model": args.model, "data": args.data, "batch": args.batch, "micro_batch": mb,
                "max_length": args.max_length, "steps": args.steps + 1, "optimizer": args.optimizer,
                "lora_r": args.lora_r, "precision": "fp32", "device": "cpu", "threads": args.threads}
    result = {"settings": settings, "machine": machine(), "predicted": pred, "runs": runs,
              "rows": runs[allocators[0]]["rows"]}
    result["table"] = format_plan_check(result)
    return result


# ------------------------------------------------------------------------------------------------
# --fsdp-memory: commands watched from outside


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


MARK_PREFIX = "[directpo-bench-mark]"
_MARK_RE = re.compile(re.escape(MARK_PREFIX) + r" (\w+) rank=(\S+) t=([\d.]+) rss=(\d+) hwm=(\d+) anon=(\d+) file=(\d+)")

# The measured commands' sitecustomize (see the module docstring): marks the model load and the
# reference pass in every process, by wrapping directpo.models.load_model/empty_model and
# directpo.logprobs.dataset_logps as those modules are imported (before any other module binds them).
MARK_HOOK = r'''# written by directpo.bench.memory (directpo bench --fsdp-memory): phase marks, see its docstring
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
        raise ValueError("--fsdp-memory: --nproc must be at least 2 (FSDP shards over several processes)")
    env = _child_env()
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(Path(args.pythonpath).resolve()),
                                                          env.get("PYTHONPATH")) if x)
    code = _code_of(env)
    if args.checkpoint_format == "sharded" and not code["checkpoint_format_flag"]:
        raise ValueError(f"{code['directpo']}: this directpo has no --checkpoint-format (full checkpoints only); "
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


def machine() -> dict:
    """The CPU model and the vector extensions that matter for speed and bf16."""
    import platform

    info = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE).group(1).split())
        info["flags"] = sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))
    except (OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(plan_check_child(sys.argv[2]))
    sys.exit("usage: python -m directpo.bench.memory --child SPEC.json (internal; use `directpo bench --plan-check`)")
