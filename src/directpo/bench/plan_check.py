"""`directpo bench --plan-check`: the plan's formulas (`directpo.training.plan`) against a measured run.

One directpo training run on the CPU (fp32, one process, the bench's pairs, the optimizer and
LoRA rank asked for) in its own interpreter, `python -m directpo.bench.plan_check --child SPEC`.
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
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from ..console import log
from .procfs import MeasureError, MiB, machine, read_status, reset_peak

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
    from ..training import loop  # noqa: F401 (its imports bind load_model before the wrap replaces it)

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

    from ..training.loop import train
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
    from ..logprobs import chunk_rows
    from ..training.plan import HEAD_BACKWARD_CHUNKS, HEAD_CHUNK_BYTES, head_bytes

    chunks = HEAD_BACKWARD_CHUNKS * HEAD_CHUNK_BYTES
    logits = HEAD_BACKWARD_CHUNKS * 4 * min(rows, chunk_rows(shape.vocab)) * shape.vocab
    return head_bytes(shape, pcfg) - chunks + logits


def predicted(shape, pcfg, tokens: list[list[int]], pairs: int, label_rows: list[list[int]] | None = None) -> dict:
    """The plan's figures for the run as it ran: `memory_plan` of `pcfg`, its activations at each
    step's largest micro-batch (tokens counted in the run; the LM head's part at its label rows when
    they were counted), and at the bound 2·m·max_length."""
    from ..training.plan import activation_bytes, head_bytes, memory_plan

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
    """Run `python -m directpo.bench.plan_check --child SPEC` (`runner.run_child`); a failed run is
    a `MeasureError` with its log's tail."""
    from .runner import run_child

    res = run_child(spec, work, tag, module="directpo.bench.plan_check", env_extra=env_extra)
    if "error" in res:
        raise MeasureError(f"the measured run failed ({res['error']}):\n  " + "\n  ".join(res["log_tail"]))
    return res


def plan_check(args) -> dict:
    """`directpo bench --plan-check`: the plan against measured training runs (module docstring)."""
    import shutil

    from ..training.plan import PlanConfig, model_shape
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(plan_check_child(sys.argv[2]))
    sys.exit("usage: python -m directpo.bench.plan_check --child SPEC.json (internal; use `directpo bench --plan-check`)")
