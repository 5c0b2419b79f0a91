"""Vision parity (issue #30): TRL 1.16 DPOTrainer's reference log-probs of image preference pairs
against directpo's, per pair (run by tests/bench/test_vision_parity.py and
scripts/vision_parity.py, which writes docs/results/vision-parity.md and .json).

What TRL 1.16 does with image pairs, read from its source (trl/trainer/dpo_trainer.py):

* `DPOTrainer(precompute_ref_log_probs=True)` *refuses* a vision dataset in `__init__` ("not supported
  for vision datasets"): the issue's "TRL with `precompute_ref_log_probs`" cannot be run as such.
  What we run instead is TRL's own precompute routine, reached past that one guard: the trainer is
  built with `precompute_ref_log_probs=False` (which also makes it load its reference model from the
  model folder, as it does for training), then `_precompute_ref_logps` is called on the train
  dataset, exactly as `__init__` would call it, with the model hash `__init__` would have set. The
  numbers are therefore those of TRL's vision collator (`DataCollatorForVisionPreference`), its
  `compute_ref_log_probs` and its fused LM head (`add_fused_lm_head`) - the code a TRL user gets from
  `precompute_ref_log_probs=False` at every step. Nothing in TRL is patched; the guard is bypassed
  only inside the child process (`_trl_child`).
* Tokenization: the processor's chat template renders the prompt (with the generation prompt) and
  prompt+response; the response *text* is what follows the prompt text. TRL tokenizes the prompt
  (with the images, so the placeholder expands to the image tokens) and each response *separately*
  (`add_special_tokens=False`) and concatenates the ids. So the scored tokens are those of the
  response text alone, including the template's end-of-turn (here `<|eos|>` and the newline after
  it). A tokenizer that merged across the prompt/response boundary would make TRL's tokens differ
  from a joint tokenization; `transformers_logps` checks that the joint tokenization of this data
  splits there (it raises otherwise).
* Truncation: the vision collator cuts at `max_length` only (no prompt limit, keep_start); we pass
  `max_length=None`, so nothing is truncated on either side.
* Batches: prompts padded on the left, responses on the right, then flushed left; the chosen and
  rejected rows of a batch are one forward pass, the image encoded twice (once per response).

TRL runs in a child process (`python -m directpo.bench.vision_parity --trl-child SPEC OUT`): the
Trainer seeds the global RNGs, sets up accelerate's process state and patches the model's forward.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TOL = 1e-3


def read_pairs(data_jsonl: str | Path, n: int) -> list[dict]:
    """The first `n` rows of a TRL-format vision JSONL, image paths made absolute (they are relative
    to the JSONL's folder)."""
    data = Path(data_jsonl)
    rows = []
    with open(data) as f:
        for line in f:
            if len(rows) >= n:
                break
            if line.strip():
                row = json.loads(line)
                if "image" in row:
                    row["images"] = [row.pop("image")]
                row["images"] = [str(data.parent / p) for p in row.get("images", [])]
                rows.append(row)
    if len(rows) < n:
        raise ValueError(f"{data}: {len(rows)} rows, fewer than the {n} asked for")
    return rows


# ------------------------------------------------------------------------------------------------
# TRL's side (in a child process)

def trl_reference_logps(model_dir: str | Path, data_jsonl: str | Path, n: int, batch_size: int = 8,
                        details: bool = False):
    """(n, 2) TRL 1.16 reference log-probs (chosen, rejected) of the first n rows, in row order, fp32
    on the CPU. `details`: also a dict with the response tokens TRL scored per side and its version."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model_dir), "data": str(data_jsonl), "n": n,
                                    "batch_size": batch_size, "output_dir": str(Path(tmp) / "trainer")}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "TQDM_DISABLE": "1",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(Path(tmp) / "datasets")}
        proc = subprocess.run([sys.executable, "-m", "directpo.bench.vision_parity", "--trl-child", str(spec),
                               str(out)], capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"TRL child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        res = json.loads(out.read_text())
    logps = torch.tensor(res.pop("logps"), dtype=torch.float64)
    return (logps, res) if details else logps


def _trl_dataset(rows: list[dict]):
    """The rows as TRL's users give them: a `datasets` Dataset whose `images` column decodes to PIL."""
    from datasets import Dataset, Image, List

    keep = [{k: r[k] for k in ("images", "prompt", "chosen", "rejected")} for r in rows]
    return Dataset.from_list(keep).cast_column("images", List(Image()))


def _trl_child(spec: dict) -> dict:
    import trl
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import hash_module

    from ..vision import load_processor, load_vision_model

    torch.manual_seed(0)
    rows = read_pairs(spec["data"], spec["n"])
    model = load_vision_model(spec["model"], dtype=torch.float32)
    processor = load_processor(spec["model"])  # Qwen2-VL's without its video part: no torchvision here
    bs = spec["batch_size"]
    cfg = DPOConfig(output_dir=spec["output_dir"], precompute_ref_log_probs=False, max_length=None,
                    per_device_train_batch_size=bs, use_cpu=True, report_to="none", save_strategy="no",
                    dataloader_num_workers=0, seed=0, bf16=False, fp16=False, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=_trl_dataset(rows), processing_class=processor)
    # What __init__ would do with precompute_ref_log_probs=True, but for its vision-dataset guard
    # (see the module docstring): the same hash, then the same routine on the train dataset.
    trainer._precompute_model_hash = hash_module(trainer.ref_model or trainer.model)
    trainer.precompute_ref_logps = True
    tokens = []
    scored = trainer.compute_ref_log_probs

    def recording(model, inputs):  # records how many response tokens TRL scored per side
        n_chosen, n_rejected = inputs["completion_mask"].sum(dim=1).chunk(2)
        tokens.extend(zip(n_chosen.tolist(), n_rejected.tolist()))
        return scored(model, inputs)

    trainer.compute_ref_log_probs = recording
    ds = trainer._precompute_ref_logps(trainer.train_dataset, "train", bs)
    cols = ds.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_list()
    return {"logps": [[c["ref_chosen_logps"], c["ref_rejected_logps"]] for c in cols],
            "tokens": [list(t) for t in tokens], "trl_version": trl.__version__,
            "model_type": model.config.model_type}


# ------------------------------------------------------------------------------------------------
# Plain transformers: the definition, written out (proves the harness without directpo's side)

def _render(processor, row: dict, side: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, prompt+response text) from the processor's template."""
    prompt = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(row["prompt"] + row[side], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"the template's prompt+{side} text does not start with its prompt text")
    return prompt, full


@torch.no_grad()
def transformers_logps(model_dir: str | Path, data_jsonl: str | Path, n: int) -> torch.Tensor:
    """(n, 2) summed log-probs of each response given its prompt and images: the processor on the
    whole prompt+response text (one sequence, no padding), the model's logits, log-softmax, gathered at
    the response tokens. The response starts where the prompt's own tokenization ends."""
    from PIL import Image

    from ..vision import load_processor, load_vision_model

    model = load_vision_model(str(model_dir), dtype=torch.float32).eval()
    processor = load_processor(str(model_dir))
    out = torch.empty(n, 2, dtype=torch.float64)
    for i, row in enumerate(read_pairs(data_jsonl, n)):
        images = [Image.open(p).convert("RGB") for p in row["images"]] or None
        for j, side in enumerate(("chosen", "rejected")):
            prompt, full = _render(processor, row, side)
            p_ids = processor(text=[prompt], images=images, add_special_tokens=False)["input_ids"][0]
            enc = processor(text=[full], images=images, add_special_tokens=False, return_tensors="pt")
            ids = enc["input_ids"][0]
            if ids[:len(p_ids)].tolist() != list(p_ids):
                raise ValueError(f"row {i}: tokenizing prompt+{side} merges tokens across the prompt boundary")
            logp = torch.log_softmax(model(**enc).logits[0, :-1].double(), dim=-1)
            picked = logp.gather(1, ids[1:, None])[:, 0]
            out[i, j] = picked[len(p_ids) - 1:].sum()
    return out


# ------------------------------------------------------------------------------------------------
# directpo's side

def directpo_logps(model_dir: str | Path, data_jsonl: str | Path, n: int, layout: str = "padded",
                   batch_size: int = 8) -> torch.Tensor:
    """(n, 2) directpo's reference log-probs: `directpo.data.vision_tokenize.tokenize_vision_examples`,
    `make_collate(layout)`, `dataset_logps` (what a run's reference table holds), fp32."""
    from ..data.collate import make_collate
    from ..logprobs import dataset_logps
    from ..vision import load_vision_model

    processor, examples = _directpo_tokenized(model_dir, data_jsonl, n)
    model = load_vision_model(str(model_dir), dtype=torch.float32).eval()
    pad_id = processor.tokenizer.pad_token_id
    return dataset_logps(model, examples, make_collate(layout, pad_id), batch_size=batch_size).double()


def directpo_packed_logps(model_dir: str | Path, data_jsonl: str | Path, n: int) -> torch.Tensor:
    """`directpo_logps` in the packed layout ([prompt with its image tokens | chosen | rejected])."""
    return directpo_logps(model_dir, data_jsonl, n, layout="packed")


def directpo_response_tokens(model_dir: str | Path, data_jsonl: str | Path, n: int) -> list[list[int]]:
    """[chosen, rejected] response token counts of each pair as directpo tokenizes them."""
    _, examples = _directpo_tokenized(model_dir, data_jsonl, n)
    return [[len(ids) for ids in ex.response_ids] for ex in examples]


def _directpo_tokenized(model_dir: str | Path, data_jsonl: str | Path, n: int):
    """(processor, tokenized examples) of the first n rows, read by directpo's data layer (its reader
    and format, images included) and tokenized untruncated (as TRL with max_length=None)."""
    from ..data.formats import load_examples
    from ..data.vision_tokenize import tokenize_vision_examples
    from ..vision import load_processor

    processor = load_processor(str(model_dir))
    examples, _ = tokenize_vision_examples(load_examples(str(data_jsonl))[:n], processor, max_length=None)
    if len(examples) != n:
        raise ValueError(f"directpo kept {len(examples)} of {n} pairs")
    return processor, examples


# ------------------------------------------------------------------------------------------------
# The comparison and its table

def compare(trl: torch.Tensor, other: torch.Tensor, tol: float = TOL) -> dict:
    """Per-pair |Δ| between two (n, 2) tables: max, median, mean, the worst pair, how many exceed tol."""
    if trl.shape != other.shape:
        raise ValueError(f"shapes differ: TRL {tuple(trl.shape)}, other {tuple(other.shape)}")
    diff = (trl.double() - other.double()).abs()
    per_pair = diff.max(dim=1).values
    flat = diff.flatten().tolist()
    worst = int(per_pair.argmax())
    return {"pairs": trl.shape[0], "max_abs_diff": max(flat), "median_abs_diff": statistics.median(flat),
            "mean_abs_diff": sum(flat) / len(flat), "worst_pair": worst,
            "over_tol": int((per_pair > tol).sum()), "tol": tol,
            "per_pair": [[round(a, 8), round(b, 8)] for a, b in diff.tolist()]}


def parity_table(model_dir: str | Path, data_jsonl: str | Path, n: int,
                 directpo_logps: Callable[[str | Path, str | Path, int], torch.Tensor] = directpo_logps,
                 label: str | None = None, trl: tuple[torch.Tensor, dict] | None = None) -> dict:
    """TRL's reference log-probs of the first n pairs against `directpo_logps(model_dir, data_jsonl, n)`
    (another (n, 2) computation can stand in), per pair; a dict for `write_report`. `trl`: TRL's
    result already computed (`trl_reference_logps(..., details=True)`), to compare several sides."""
    trl_logps, info = trl if trl is not None else trl_reference_logps(model_dir, data_jsonl, n, details=True)
    ours = directpo_logps(model_dir, data_jsonl, n)
    res = compare(trl_logps, ours)
    return {"model": label or info["model_type"], "model_type": info["model_type"],
            "trl_version": info["trl_version"], "side": getattr(directpo_logps, "__name__", str(directpo_logps)),
            "response_tokens": sorted({t for pair in info["tokens"] for t in pair}), **res,
            "trl": trl_logps.tolist(), "other": ours.tolist()}


def markdown(results: list[dict], note: str = "") -> str:
    head = f"| model | pairs | compared with | response tokens | max \\|Δ\\| | median \\|Δ\\| | pairs over {TOL:g} |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['model']} | {r['pairs']} | `{r['side']}` | {', '.join(map(str, r['response_tokens']))} "
                     f"| {r['max_abs_diff']:.2e} | {r['median_abs_diff']:.2e} | {r['over_tol']} |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def write_report(results: list[dict], md_path: str | Path, header: str = "", note: str = "") -> None:
    """The table as markdown at md_path and everything (per-pair values included) as JSON beside it."""
    from ..diskio import write_text

    md_path = Path(md_path)
    write_text(md_path, (header.rstrip() + "\n\n" if header else "") + markdown(results, note))
    # One result per line: the per-pair values would otherwise run to thousands of lines.
    write_text(md_path.with_suffix(".json"), "[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--trl-child":
        result = _trl_child(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.exit(0)
    sys.exit("usage: python -m directpo.bench.vision_parity --trl-child SPEC.json OUT.json (internal)")
