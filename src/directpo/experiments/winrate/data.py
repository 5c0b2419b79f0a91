"""Stage 1, the data: preference pairs for training, held-out prompts (with the human reference)
for evaluation, and text to pretrain a from-scratch model on.

Dialogue reads anything `directpo train` reads (HH-RLHF transcripts included: the prompt is the
shared prefix up to the last "\\n\\nAssistant:"); summarize reads Reddit TL;DR comparison rows
(`directpo.data.tldr`). Eval prompts are never training prompts: they come from --eval-data minus
every training prompt, or are held out of --data whole (every row of an eval prompt leaves the
training set). The reference of an eval prompt is the chosen response of its first row.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ...config import ConfigError
from ...errors import UserValueError
from ..common import find_shared
from ..resume import stage

HH_RELATIVE_PATH = Path("shared") / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
HH_ASSISTANT = "\n\nAssistant:"


def stage_data(cfg, out: Path) -> dict:
    """OUT/data/{train,eval,pretrain}.jsonl and what they hold (recorded: done once)."""
    return stage(out, "data", lambda data_dir: prepare_data(cfg, data_dir))


def default_data(cfg) -> str:
    """The HH-RLHF pairs shipped next to the checkout (dialogue); else an error naming --data."""
    if cfg.TASK == "dialogue":
        found = find_shared(HH_RELATIVE_PATH, Path(__file__).resolve())
        if found is not None:
            return str(found)
        raise ConfigError(f"no data: --data is not given and the HH-RLHF pairs ({HH_RELATIVE_PATH}) are not in the "
                          f"working directory {Path.cwd()} or any directory above it; pass --data (a file, or "
                          "Anthropic/hh-rlhf:train from the hub)")
    raise ConfigError("no data: pass --data with Reddit TL;DR comparisons (a JSONL file of {info, summaries, choice} "
                      "rows, or openai/summarize_from_feedback:train from the hub)")


def read_pairs(cfg, spec: str, report) -> list[dict]:
    """{prompt, chosen, rejected} rows of `spec` in file order (bad rows: error, or skipped and counted)."""
    if cfg.TASK == "summarize":
        from ...data.tldr import load_tldr_pairs

        return load_tldr_pairs(spec, config=cfg.data_config, on_invalid=cfg.on_invalid, report=report)
    from ...data.formats import load_examples

    return [{"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
            for ex in load_examples(spec, cfg.on_invalid, None, report)]


def human_turns(prompt) -> int:
    """Human turns of a prompt: "Human:" headers of an HH transcript, or user messages."""
    if isinstance(prompt, list):
        return sum(m.get("role") == "user" for m in prompt)
    return prompt.count("\n\nHuman:") + prompt.startswith("Human:")


def prompt_key(prompt) -> str:
    """A hashable form of a prompt (text, or messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def source_of(cfg, data_dir: Path) -> tuple[str, bool]:
    """(the training data's spec, whether it is synthetic): --data, else the synthetic TL;DR-format
    rows of the smoke preset (written to OUT/data/synthetic_tldr.jsonl), else the shipped HH pairs."""
    if cfg.data:
        return cfg.data, False
    if getattr(cfg, "synthetic_data", 0):
        from ...data.formats import write_jsonl
        from .synthetic import synthetic_tldr_rows

        path = write_jsonl(synthetic_tldr_rows(cfg.synthetic_data, cfg.seed), data_dir / "synthetic_tldr.jsonl")
        return str(path), True
    return default_data(cfg), False


def prepare_data(cfg, data_dir: Path) -> dict:
    from ...data.formats import SkipReport, write_jsonl

    source, synthetic = source_of(cfg, data_dir)
    report = SkipReport()
    rows = read_pairs(cfg, source, report)
    if cfg.max_rows:
        rows = rows[:cfg.max_rows]
    keep = (lambda r: human_turns(r["prompt"]) == 1) if getattr(cfg, "single_turn", False) else (lambda r: True)
    pairs = [r for r in rows if keep(r)]
    if cfg.eval_data:
        eval_report = SkipReport()
        held_out = [r for r in read_pairs(cfg, cfg.eval_data, eval_report) if keep(r)]
        report.counts.update(eval_report.counts)
        train, evals = pairs, pick_eval_rows(cfg, held_out, exclude={prompt_key(r["prompt"]) for r in pairs})
    else:
        evals = pick_eval_rows(cfg, pairs, exclude=set())
        eval_keys = {prompt_key(r["prompt"]) for r in evals}
        train = [r for r in pairs if prompt_key(r["prompt"]) not in eval_keys]
    train, judge = split_judge(cfg, train)
    if len(train) < 2:
        raise UserValueError(f"{source}: {len(train)} training pairs left after holding out {len(evals)} eval prompts"
                             f" and {len(judge)} judge pairs; lower --n-eval-prompts or --judge-fraction, or give more "
                             "data")
    texts = pretraining_texts(rows, evals) if cfg.base_model is None else []
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(evals, data_dir / "eval.jsonl")
    if judge:
        write_jsonl(judge, data_dir / "judge.jsonl")
    write_jsonl(({"prompt": "", "completion": t} for t in texts), data_dir / "pretrain.jsonl")
    return {"source": source, "eval_source": cfg.eval_data or source, "synthetic": synthetic, "rows_read": len(rows),
            "skipped": report.total, "skipped_summary": report.summary() if report.total else "",
            "single_turn": getattr(cfg, "single_turn", False), "pairs": len(pairs), "train_pairs": len(train),
            "train_prompts": len({prompt_key(r["prompt"]) for r in train}), "eval_prompts": len(evals),
            "pretrain_texts": len(texts), "judge_pairs": len(judge),
            "judge_prompts": len({prompt_key(r["prompt"]) for r in judge}),
            "judge_split_seed": judge_split_seed(cfg) if judge else None}


def judge_split_seed(cfg) -> int:
    # not the eval shuffle's seed: the two splits are drawn independently
    return cfg.seed + 1_000_003


def split_judge(cfg, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the policies' pairs, the judge's pairs): a seeded share (--judge-fraction) of the training
    PROMPTS, every row of a prompt on one side, so the judge is trained on prompts neither DPO nor PPO
    nor their reward model sees (none for an external judge)."""
    if not cfg.own_judge():
        return rows, []
    keys = sorted({prompt_key(r["prompt"]) for r in rows})
    random.Random(judge_split_seed(cfg)).shuffle(keys)
    judged = set(keys[:round(cfg.judge_fraction * len(keys))])
    if len(judged) < 2:
        raise UserValueError(f"--judge-fraction {cfg.judge_fraction:g} of {len(keys)} training prompts leaves the judge "
                             f"{len(judged)} prompts; raise it or give more data")
    return ([r for r in rows if prompt_key(r["prompt"]) not in judged],
            [r for r in rows if prompt_key(r["prompt"]) in judged])


def pick_eval_rows(cfg, rows: list[dict], exclude: set) -> list[dict]:
    """`n_eval_prompts` distinct prompts (seeded shuffle), none in `exclude`: the first row of each."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(prompt_key(r["prompt"]), r)
    keys = sorted(k for k in first if k not in exclude)
    random.Random(cfg.seed).shuffle(keys)
    # The training set needs prompts too when the eval prompts come out of the same data.
    room = len(keys) if cfg.eval_data else len(keys) - 2
    if room < cfg.n_eval_prompts:
        raise UserValueError(f"{cfg.eval_data or cfg.data or 'the data'}: only {max(room, 0)} distinct prompts can be "
                             f"held out for evaluation, {cfg.n_eval_prompts} asked; lower --n-eval-prompts")
    return [first[k] for k in keys[:cfg.n_eval_prompts]]


def pretraining_texts(rows: list[dict], evals: list[dict]) -> list[str]:
    """Whole texts (prompt + response, both responses) of every row read, except those of an eval
    prompt or of a conversation that starts like one: a from-scratch model never reads the held-out
    prompts or their references."""
    from ...data.formats import message_text

    stems = [s for s in (message_text(r["prompt"]).removesuffix(HH_ASSISTANT).rstrip() for r in evals) if s]
    texts = []
    for r in rows:
        prompt = message_text(r["prompt"])
        if any(prompt.startswith(s) for s in stems):
            continue
        texts += [prompt + message_text(r["chosen"]), prompt + message_text(r["rejected"])]
    return list(dict.fromkeys(texts))
