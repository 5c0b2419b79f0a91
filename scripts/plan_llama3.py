"""The Llama-3-8B / 70B tables of docs/results/bench/plan-llama3.md and the README (`directpo plan`).

    python scripts/plan_llama3.py DIR_8B DIR_70B OUT.json > table.md

DIR_* hold the published config.json of each model (the commands are in plan-llama3.md)."""
import json
import sys
from dataclasses import asdict, replace

from directpo.training.plan import PlanConfig, model_shape, plan

GiB = 1024 ** 3
CLUSTERS = [("8×80", 8, 1), ("2×8×80", 8, 2)]
MODES = [("DDP", {}, ["adamw", "rmsprop"]), ("FSDP", {"fsdp": True}, ["adamw", "rmsprop"]),
         ("LoRA r16 DDP", {"lora_r": 16}, ["adamw"]), ("LoRA r16 FSDP", {"lora_r": 16, "fsdp": True}, ["adamw"])]


def rows(dirs):
    for name, d in zip(("8B", "70B"), dirs):
        s = model_shape(d)
        for cname, nproc, nnodes in CLUSTERS:
            for mname, kw, opts in MODES:
                for opt in opts:
                    lengths = (2048, 4096) if (mname == "FSDP" and opt == "adamw" and nnodes == 1) else (2048,)
                    for length in lengths:
                        cfg = PlanConfig(model=d, nproc=nproc, nnodes=nnodes, batch_size=64, micro_batch_size=1,
                                         max_length=length, precision="bf16", optimizer=opt, memory_per_device=80.0,
                                         **kw)
                        p = plan(cfg, s)
                        ac = plan(replace(cfg, activation_checkpointing=True), s)["plan"]
                        settings = {k: v for k, v in asdict(cfg).items() if k in (
                            "nproc", "nnodes", "batch_size", "micro_batch_size", "max_length", "precision", "optimizer",
                            "fsdp", "lora_r", "memory_per_device")}
                        yield {"model": name, "cluster": cname, "mode": mname, "optimizer": opt, "max_length": length,
                               "params": s.params, "settings": settings, **p["plan"],
                               "suggestion": (p.get("suggestion") or {}).get("change"),
                               "with_activation_checkpointing": {k: ac[k] for k in (
                                   "total", "fits", "largest_micro_batch")} | {
                                   "activations": ac["parts"]["activations"]}}


def main(argv):
    out = list(rows(argv[:2]))
    with open(argv[2], "w") as f:
        json.dump(out, f, indent=1)

    def g(x):
        return f"{x / GiB:.1f}"
    print("| model | GPUs | mode | optimizer | max_length | weights | bf16 copies | gradients | optimizer state | "
          "gathered blocks | activations (1 pair) | total | fits | largest micro-batch | + activation checkpointing: "
          "total, largest micro-batch |")
    print("| --- " * 15 + "|")
    for o in out:
        q, a = o["parts"], o["with_activation_checkpointing"]
        print(f"| {o['model']} | {o['cluster']} | {o['mode']} | {o['optimizer']} | {o['max_length']} | "
              f"{g(q['weights'])} | {g(q['bf16_weight_copies'])} | {g(q['gradients'])} | {g(q['optimizer'])} | "
              f"{g(q['fsdp_gathered_blocks'])} | {g(q['activations'])} | {g(o['total'])} | "
              f"{'yes' if o['fits'] else 'no'} | {o['largest_micro_batch'] or '–'} | "
              f"{g(a['total'])}, {a['largest_micro_batch'] or '– (does not fit)'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
