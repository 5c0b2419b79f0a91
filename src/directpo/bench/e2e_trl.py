"""The TRL side of `directpo bench --end-to-end`: the script a TRL user would write for the same run
(DPOTrainer on the same model, pairs and settings, the same optimizer), with its phases timed.

    python -P e2e_trl.py SPEC.json     (started by `end_to_end.py`; run as a file, not `-m`)

It imports nothing from directpo, so its import time is TRL's own. SPEC holds `model`, `data` (the
prompt/chosen/rejected JSONL), `output_dir`, `dpo_config` (DPOConfig's keyword arguments, made by
the parent: batch, accumulation, steps, max_length, β, directpo's optimizer), `threads`,
`t_launch` (the parent's `time.time()` just before it started this process) and `result`.
Phases: import (from launch), load (rows, tokenizer, model), tokenize (DPOTrainer's constructor
less its reference pass), reference (`_precompute_ref_logps`, where TRL has it), steps
(`train()`), save (`save_model`: weights and tokenizer).
"""
import json
import resource
import sys
import time


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    seconds = {"import": time.time() - spec["t_launch"]}
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)

    t = time.perf_counter()
    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True)
    seconds["load"] = time.perf_counter() - t

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                seconds["reference"] = seconds.get("reference", 0.0) + time.perf_counter() - t0

    t = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=DPOConfig(output_dir=spec["output_dir"], **spec["dpo_config"]),
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
    seconds["tokenize"] = time.perf_counter() - t - seconds.get("reference", 0.0)
    t = time.perf_counter()
    trainer.train()
    seconds["steps"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.save_model(spec["output_dir"])
    seconds["save"] = time.perf_counter() - t
    with open(spec["result"], "w") as f:
        json.dump({"rc": 0, "phases": seconds, "steps_done": trainer.state.global_step, "t_end": time.time(),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
