"""`directpo plan --model M ...`: the memory a run needs per device, from the model's config alone."""
from __future__ import annotations

import json

from ..config import add_flags, build_config
from ..training.plan import GiB, PlanConfig, cpu_heap_factor


def register(command: str, parser) -> None:
    add_flags(parser, PlanConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..api import plan

    cfg = build_config(args, PlanConfig)
    result = plan(cfg)
    print(json.dumps(result, indent=1) if cfg.json else format_plan(result))
    return 0


def _gib(n: float) -> str:
    if n >= GiB / 10 or n == 0:
        return f"{n / GiB:8.2f} GiB"
    return f"{n / 2 ** 20:8.2f} MiB" if n >= 2 ** 20 / 10 else f"{n / 1024:8.2f} KiB"  # (LoRA's gradients)


def _count(n: int) -> str:
    return next(f"{n / d:.3g} {u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, "")) if n >= d or d == 1)


def _image_line(im: dict, cfg: dict) -> str:
    (h, w), n, left = im["image_size"], im["image_tokens"], im["text_tokens_left"]
    line = (f"an image of {h}x{w} becomes {n} image tokens ({im['tower_tokens']} in the vision tower, "
            f"{im['pixel_bytes'] / 2 ** 20:.2f} MiB of pixels); {im['per_pair']} a pair")
    if left < 1:
        return line + (f": more than --max-length {cfg['max_length']} holds (train refuses such rows): raise it "
                       "or plan a smaller --image-size")
    return line + f", within --max-length {cfg['max_length']}: {left} tokens left for text"


def format_plan(result: dict) -> str:
    """The plan as a table a person reads."""
    cfg, p, s = result["settings"], result["plan"], result["shape"]
    world = cfg["nproc"] * cfg["nnodes"]
    mode = "FSDP" if cfg["fsdp"] else "data parallel (each device holds the whole model)" if world > 1 else \
        "one device"
    lines = [f"{result['model']}: {_count(s['params'])} parameters ({s['layers']} blocks, hidden {s['hidden']}), "
             f"{world} device(s) of {cfg['memory_per_device']:g} GiB, {mode}",
             f"micro-batch {cfg['micro_batch_size']} pairs × 2 × {cfg['max_length']} tokens, {cfg['precision']}, "
             f"{cfg['optimizer']}" + (f", LoRA r={cfg['lora_r']}" if cfg["lora_r"] else "")
             + (f", base quantized {cfg['quantize']}" if cfg.get("quantize", "none") != "none" else "")
             + (", activation checkpointing" if cfg["activation_checkpointing"] else ""), ""]
    if "images" in result:
        lines[-1:-1] = [_image_line(result["images"], cfg)]
    for k, v in p["parts"].items():
        lines.append(f"  {k.replace('_', ' '):<22}{_gib(v)}")
    for k, v in p["host"].items():
        lines.append(f"  {k + ' (host memory)':<22}{_gib(v)}")
    lines += [f"  {'total per device':<22}{_gib(p['total'])}",
              f"  {'usable (90 %)':<22}{_gib(p['budget'])}"]
    if cfg["fsdp"]:
        lines.append(f"  {'setup, each rank':<22}{_gib(p['setup_rank0'])}  (its shards, read row by row)")
    lines += ["", f"fits: {'yes' if p['fits'] else 'no'}; largest micro-batch that fits: "
                  f"{p['largest_micro_batch'] or 'none'}",
              "on a CPU: the total is what the process holds with its C heap bounded (--memory-budget does it);",
              f"  under glibc's default heap a run held up to {cpu_heap_factor(cfg):.2f}× it (freed temporaries "
              "kept between activations)"]
    if "suggestion" in result:
        fix = result["suggestion"]
        if fix is None and cfg["fsdp"] and p["setup_rank0"] > p["budget"]:
            lines.append("does not fit: at setup a rank holds its shards of the weights")
        elif fix is None:
            lines.append("no change of micro-batch, checkpointing, FSDP or LoRA makes it fit: use more devices")
        else:
            change = ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
                               for k, v in fix["change"].items())
            lines.append(f"to fit: {change} ({_gib(fix['plan']['total']).strip()} per device)")
    return "\n".join(lines)
