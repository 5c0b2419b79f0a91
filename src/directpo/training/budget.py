"""`--memory-budget`: the micro-batch size a training run picks for the memory it is given, measured
on the real model once it is loaded (the static, on-paper plan of `directpo plan` is
`training.plan`, whose formulas this falls back on where a measurement cannot see).

need(m) = now + gradients + optimizer state + a + b·tokens(m) [+ the LM head's chunk, on the CPU]

  now        memory the process holds when training is about to start (weights, a live
             reference, the data): CUDA memory allocated on the device, or the process's RSS
  gradients, optimizer state   not allocated yet: 4·T and 4·T × states, as in `training.plan` (T
             counted on the loaded model, adapters only under LoRA)
  a + b·t    activations of a micro-batch of t tokens, measured on the real model, layout and
             precision at two points (the longest example, and the same cut to half: no
             probe larger than micro-batch 1, so measuring never passes a budget that fits one):
             the peak of allocated memory over a forward and backward on CUDA; on the CPU the
             bytes autograd keeps for the backward (distinct storages, parameters excluded),
             counted through saved-tensor hooks. Not RSS: the allocator keeps and reuses the pages
             the reference pass freed, and a process's peak RSS cannot be reset, so an RSS
             difference would not isolate one forward. The CPU count leaves out the backward's
             short-lived temporaries, of which the largest is the LM head's chunk of logits
             (`HEAD_CHUNK_BYTES`, added). With activation checkpointing the layers' insides
             are recomputed out of autograd's sight, so there the per-token cost is
             `training.plan`'s formula instead.
  tokens(m)  tokens of the longest micro-batch the loader could form: the m longest examples of
             the data set together, collated in the run's layout

On the CPU the count is what the process then holds only because a budget run fixes glibc's mmap
threshold (`memory.bound_heap`, at setup): under glibc's default the heap keeps the forward's freed
temporaries between the kept activations (a 0.5B LoRA run at its bound: 1.4× the count).

The micro-batch is the largest divisor of --batch-size (at most a process's share) with
need(m) ≤ budget, so the accumulated gradient is the same as for any other split.

When not even micro-batch 1 fits, the plan escalates rather than fails, cheapest step first:
activation checkpointing (its per-token cost from `training.plan`'s formula; it only recomputes,
the gradients are the same), then, on CUDA only, the optimizer state in host memory
(--optimizer-offload: its 4·T × states bytes leave the device; on the CPU they are in host memory
already, so it would change nothing). What it turned on is set in the run's settings and so in
every checkpoint: a resumed run keeps it. Only when all of that does not fit is it
`MemoryBudgetError`, naming the minimum with everything on.
"""
from __future__ import annotations

from ..config import ConfigError
from ..console import log
from ..data import make_collate
from ..data.image_features import pending_bytes
from ..memory import GiB, KiB, MiB, current_memory, parse_size, size_str  # noqa: F401 (re-exported)
from ..models import enable_activation_checkpointing, unwrap_peft
from .plan import HEAD_CHUNK_BYTES, OPTIMIZER_STATES, PlanConfig, activation_bytes, head_bytes, shape_of


class MemoryBudgetError(ConfigError):
    """--memory-budget too small for even one example per micro-batch."""


def choose_micro_batch(budget: int, batch_size: int, world: int, fixed: int, intercept: float, per_token: float,
                       tokens_of, keep: int | None = None, agree=None, measures: str = "") -> dict:
    """The plan: the largest divisor m of `batch_size` (≤ a process's share) whose need(m) =
    fixed + intercept + per_token · tokens_of(m) fits `budget`; `MemoryBudgetError` naming the
    minimum when not even m = 1 does. `keep`: that micro-batch size, fitting or not (a resumed run).
    `agree`: several processes' sum (`Dist.sum_stats`): a size is taken only where it fits on all.
    `measures`: what the need already counts on, said in the error (" with activation checkpointing")."""
    def need(m: int) -> int:
        return int(fixed + intercept + per_token * tokens_of(m))

    share = max(1, batch_size // world)
    votes = {str(m): float(need(m) <= budget) for m in range(1, share + 1) if batch_size % m == 0}
    votes = agree({**votes, "ranks": 1.0}) if agree is not None else {**votes, "ranks": 1.0}
    fitting = [int(m) for m, v in votes.items() if m != "ranks" and v == votes["ranks"]]
    if not fitting and keep is None:
        raise MemoryBudgetError(
            f"--memory-budget {size_str(budget)}: too small for this run, which needs at least {size_str(need(1))}"
            f"{measures} (one example per micro-batch: {size_str(fixed)} of weights, gradients, optimizer state and the "
            f"process, {size_str(need(1) - fixed)} of activations for the longest example, {tokens_of(1)} tokens)")
    m = keep or max(fitting)
    return {"micro_batch_size": m, "budget": budget, "need": need(m), "fits": need(m) <= budget,
            "fixed": int(fixed), "activations": need(m) - int(fixed), "tokens": tokens_of(m),
            "bytes_per_token": per_token, "bytes_per_micro_batch": intercept,
            "need_by_micro_batch": {m: need(int(m)) for m in votes if m != "ranks"}}


def format_memory_plan(p: dict) -> str:
    return (f"--memory-budget {size_str(p['budget'])}: micro-batch {p['micro_batch_size']} (its longest possible "
            f"micro-batch, {p['tokens']} tokens, needs {size_str(p['need'])}: {size_str(p['fixed'])} fixed + "
            f"{size_str(p['activations'])} activations at {p['bytes_per_token'] / 1024:.1f} KiB per token)")


def activation_bytes_measured(policy, batch, device, precision: str) -> int:
    """Activation memory of one forward/backward of `batch` (see the module docstring): CUDA's
    peak allocation over it, or on the CPU the bytes autograd keeps for its backward. The global
    RNG is restored afterwards and no gradient is left behind, so the run that follows is the one
    it would have been without the probe."""
    import torch

    from ..logprobs import example_logps
    from ..models import autocast_ctx

    trainable = [p for p in policy.parameters() if p.requires_grad]
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with autocast_ctx(device, precision):
                lp = example_logps(policy, batch)
            # only the first trainable tensor's gradient: the whole backward chain runs, no weight
            # gradients are materialised (they are `fixed`, counted by formula)
            torch.autograd.backward(lp.nansum(), inputs=trainable[:1])
            trainable[0].grad = None
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
        kept: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                kept[ptr] = t.untyped_storage().nbytes()
            # detached: the same storage, kept alive so no other tensor reuses its address during the
            # count, but not the tensor itself, whose grad_fn would then hold its own saved copy: a
            # cycle the garbage collector cannot see, so every probe's activations stayed resident
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_ctx(device, precision):
            lp = example_logps(policy, batch)
        del lp  # the graph goes, nothing ran backward
        return sum(kept.values()) + HEAD_CHUNK_BYTES


def plan_for_budget(cfg, policy, train_set, collate, device, world: int = 1, keep: int | None = None,
                    agree=None, checkpointed_collate=None) -> dict:
    """The --memory-budget plan of a training run whose models are loaded (see the module
    docstring); `cfg` is a `TrainConfig`. `keep`: the micro-batch size of the checkpoint a resumed
    run continues from (another one would change the trajectory's rounding), kept even when over
    budget. `checkpointed_collate`: the run's collate were activation checkpointing turned on (a
    recomputed layer attends through a dense mask: rows as long as the longest example)."""
    budget = parse_size(cfg.memory_budget, "--memory-budget")
    longest = sorted(range(len(train_set)), key=lambda i: train_set[i].num_tokens, reverse=True)

    def batch_of(m: int, through=collate):
        return through([train_set[i] for i in longest[:m]])

    def tokens_of(m: int) -> int:
        return int(batch_of(m).input_ids.numel())

    def tokens_checkpointed(m: int) -> int:
        return int(batch_of(m, checkpointed_collate or collate).input_ids.numel())

    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    # held now, and what the frozen tower's feature cache will still grow by (`data.image_features`)
    current = current_memory(device) + pending_bytes(policy, train_set)
    states = OPTIMIZER_STATES[cfg.optimizer]  # + gradients, optimizer states:
    b1, t1 = activation_bytes_measured(policy, batch_of(1).to(device), device, cfg.precision), tokens_of(1)
    intercept, per_token = 0.0, b1 / t1
    if len(longest) > 1 and cfg.batch_size // world > 1:
        # The second point is the longest example cut to half, not the two longest together: no probe
        # is larger than micro-batch 1, which a budget that fits anything must hold anyway.
        half = collate([halved(train_set[longest[0]])])
        t2 = int(half.input_ids.numel())
        if t2 < 0.9 * t1:  # (too close to t1, the slope would be noise: stay proportional)
            b2 = activation_bytes_measured(policy, half.to(device), device, cfg.precision)
            if b2 < b1:  # the line through both points: a part per micro-batch, and one per token
                per_token = (b1 - b2) / (t1 - t2)
                intercept = max(0.0, b1 - per_token * t1)
    fixed_of = lambda offload: current + 4 * trainable * (1 + (0 if offload else states))  # noqa: E731
    measured = lambda: (intercept, per_token)  # noqa: E731
    checkpointed = lambda: checkpointed_cost(cfg, policy, train_set[longest[0]].num_tokens)  # noqa: E731
    if cfg.activation_checkpointing and device.type != "cuda":  # autograd does not see inside the layers
        measured = checkpointed
    offload_on = bool(getattr(cfg, "optimizer_offload", False)) and device.type == "cuda"
    steps = [(cfg.activation_checkpointing, offload_on, measured, tokens_of)]
    if not cfg.activation_checkpointing:
        steps.append((True, offload_on, checkpointed, tokens_checkpointed))
    if not offload_on and device.type == "cuda":
        steps.append((True, True, checkpointed, tokens_checkpointed))
    return escalate(budget, cfg, world, steps, fixed_of, keep, agree, device)


def halved(example):
    """`example` with each response cut to half its tokens and, for text, the prompt to its last half
    (a vision-language prompt is kept whole: its image tokens must match its pictures)."""
    from dataclasses import replace

    responses = [r[:max(1, len(r) // 2)] for r in example.response_ids]
    if example.vision is not None:
        return replace(example, response_ids=responses)
    return replace(example, prompt_ids=example.prompt_ids[len(example.prompt_ids) // 2:], response_ids=responses)


def checkpointed_cost(cfg, policy, longest_tokens: int) -> tuple[float, float]:
    """(per micro-batch, per token) activation bytes with activation checkpointing, from
    `training.plan`'s formula: the layers' insides are recomputed out of autograd's sight, where
    the CPU count cannot see them, and turning it on just to measure would change the model."""
    pcfg = PlanConfig(model=cfg.model, max_length=max(2, longest_tokens), precision=cfg.precision,
                      activation_checkpointing=True, lora_r=cfg.lora_r)
    shape = shape_of(unwrap_peft(policy))
    intercept = head_bytes(shape, pcfg)
    return intercept, (activation_bytes(shape, pcfg, 1) - intercept) / (2 * pcfg.max_length)


def escalate(budget: int, cfg, world: int, steps: list, fixed_of, keep, agree, device) -> dict:
    """The first of `steps` — (activation checkpointing, optimizer offload, () -> activation cost,
    micro-batch -> its tokens) each,
    cheapest first — where micro-batch 1 fits (a resumed run: the first, which is its own); the
    plan records what it turned on and the line that says why. The last step's error otherwise."""
    first = None
    for i, (ckpt, offload, cost, tokens_of) in enumerate(steps):
        (intercept, per_token), last = cost(), i == len(steps) - 1
        on = [what for what, now in (("activation checkpointing", ckpt), ("the optimizer state in host memory",
                                                                           offload)) if now]
        measures = f" with {' and '.join(on)}" if on else ""
        if last and device.type != "cuda":
            measures += " (--optimizer-offload would not lower it on the CPU: the state is in host memory already)"
        try:
            p = choose_micro_batch(budget, cfg.batch_size, world, fixed_of(offload), intercept, per_token, tokens_of,
                                   keep if i == 0 else None, agree, measures if last else "")
        except MemoryBudgetError:
            if last:
                raise
            first = first or int(fixed_of(offload) + intercept + per_token * tokens_of(1))
            continue
        turned = [what for what, now, before in (("activation checkpointing", ckpt, cfg.activation_checkpointing),
                                                 ("--optimizer-offload", offload, steps[0][1])) if now and not before]
        p.update(activation_checkpointing=ckpt, optimizer_offload=offload, turned_on=turned,
                 escalation=(f"--memory-budget {size_str(budget)}: micro-batch 1 needs {size_str(first)}; with "
                             f"{' and '.join(turned)} {size_str(p['need_by_micro_batch']['1'])}: turned on")
                 if turned else None)
        return p
    raise AssertionError("no step to plan")  # `steps` always holds the run's own settings


def apply_memory_budget(t) -> None:
    """--memory-budget on a set-up `loop.Trainer` `t`: the micro-batch size measured to fit, logged and
    recorded in its settings (`t.memory_plan`); what the plan turned on, turned on."""
    keep = t.run.checkpoint_setting(t.cfg, "micro_batch_size")  # a resumed run keeps its own
    # checkpointed, a layer attends through a dense mask (`packed_row_tokens`): rows of one example
    checkpointed = make_collate(t.cfg.layout, t.tokenizer.pad_token_id, t.cfg.row_tokens or None)
    if keep is not None and t.run.checkpoint_setting(t.cfg, "activation_checkpointing") \
            and not t.cfg.activation_checkpointing:  # turned on by the budget of the run it continues
        t.cfg.activation_checkpointing = True
        enable_activation_checkpointing(t.policy)
        t.collate = checkpointed
    if keep is not None and t.run.checkpoint_setting(t.cfg, "optimizer_offload"):
        t.cfg.optimizer_offload = True
    t.memory_plan = plan_for_budget(t.cfg, t.policy, t.train_set, t.collate, t.device, t.d.world, keep,
                                    t.d.sum_stats if t.d.enabled else None, checkpointed)
    t.cfg.micro_batch_size = t.memory_plan["micro_batch_size"]
    if t.memory_plan["escalation"]:  # recorded in the settings, and so in every checkpoint
        log(t.memory_plan["escalation"])
        if t.memory_plan["activation_checkpointing"] and not t.cfg.activation_checkpointing:
            enable_activation_checkpointing(t.policy)
            t.collate = checkpointed  # (a precomputed reference table keeps the layout it was computed in)
        t.cfg.activation_checkpointing = t.memory_plan["activation_checkpointing"]
        t.cfg.optimizer_offload = t.cfg.optimizer_offload or t.memory_plan["optimizer_offload"]
    log(format_memory_plan(t.memory_plan))
    if not t.memory_plan["fits"]:
        log(f"warning: the resumed run keeps micro-batch {keep} from its checkpoint, over the budget")
