"""Stage 7, the evaluation: each method's win rate against the held-out prompts' references (the
dataset's chosen response / the chosen summary), at each sampling temperature, judged by one judge.

Policies (Preferred-FT, DPO, PPO) go through `directpo eval` (`evaluate_policy`: one sample per
prompt and temperature, the same seed for every method); Best-of-N draws max(N) samples of πSFT per
prompt at each temperature, keeps the first N's best by the learned reward model and has the judge
compare it with the reference. Every measurement is recorded as OUT/evals/*.json as soon as it is
made, so a resumed study makes it once.
"""
from __future__ import annotations

from pathlib import Path

from ..common import read_jsonl
from ..resume import resumable

# The judge's question: the paper's GPT-4 prompts (appendix C.2), by task.
JUDGE_PROMPTS = {"dialogue": "dialogue", "summarize": "summary"}
# What a temperature entry keeps of `evaluate_policy`'s / the judge's summary (read with .get: older
# judges have fewer).
ENTRY_KEYS = ("win_rate", "win_rate_se", "win_rate_ci", "win_rate_lc", "win_rate_lc_ci", "judge_consistency",
              "judge_kind", "judged", "judge_failures", "length_mean", "length_se")


def make_judge(cfg, rm: str):
    """The study's judge: the chat endpoint, the classifier, or (default) the reward model `rm`
    trained here (the judge's own, or with --judge-fraction 0 the policies')."""
    from ...eval.judge import build_judge

    local_rm = None if (cfg.judge_url or cfg.judge_classifier) else rm
    return build_judge(url=cfg.judge_url, model=cfg.judge_model, prompt=JUDGE_PROMPTS[cfg.TASK],
                       reward_model=local_rm, classifier=cfg.judge_classifier, device=cfg.device, seed=cfg.seed,
                       order="swap", retries=3, backoff=1.0, max_failure_rate=0.1, timeout=60.0, workers=4)


def judge_label(cfg, own: bool = False) -> str:
    """Which judge, in words, for the report: a local reward model is not GPT-4, and says so."""
    if cfg.judge_url:
        return (f"chat model `{cfg.judge_model}` at {cfg.judge_url}, asked the paper's "
                f"{JUDGE_PROMPTS[cfg.TASK]} question, each comparison in both orders")
    if cfg.judge_classifier:
        return f"local classifier `{cfg.judge_classifier}` (higher score wins) — NOT GPT-4 and not a human"
    if own:
        return ("local reward model trained here on its own pairs (`judge/`: prompts disjoint from the policies' "
                "training prompts and the eval prompts; higher reward wins) — NOT GPT-4 and not a human; a separate "
                "model from the reward model that Best-of-N and PPO optimise (`rm/`)")
    return ("local reward model trained here on the training pairs (`rm/`, higher reward wins) — NOT GPT-4 and not "
            "a human; Best-of-N and PPO optimise this same reward model, so their win rates are inflated by it")


def entry_of(method: str, knob, source: dict, outcomes: list | None = None) -> dict:
    entry = {"method": method, "knob": knob, "temperature": source["temperature"],
             **{k: source[k] for k in ENTRY_KEYS if k in source}}
    if outcomes is not None:
        entry["outcomes"] = outcomes
    return entry


class RecordingJudge:
    """Passes comparisons to the study's judge and keeps each call's per-prompt outcomes (1 win, 0.5
    tie, 0 loss, None failed; one sample per prompt, in prompt order): what the paired tests between
    methods compare, which `evaluate_policy`'s summary does not keep."""

    def __init__(self, judge):
        self.inner, self.calls = judge, []

    def judge(self, *args, **kwargs):
        verdicts = self.inner.judge(*args, **kwargs)
        self.calls.append(list(verdicts.outcomes))
        return verdicts


def eval_policy(cfg, out: Path, method: str, model_dir: str, sft: str, judge) -> dict:
    """Win rate and length of `model_dir` at every temperature (and its KL to πSFT)."""
    return resumable(out / "evals" / f"{method}.json",
                     lambda: measure_policy(cfg, out, method, model_dir, sft, judge))


def measure_policy(cfg, out: Path, method: str, model_dir: str, sft: str, judge) -> dict:
    from ...eval.evaluate import evaluate_policy

    evals = out / "evals"
    recorder = RecordingJudge(judge)
    result = evaluate_policy(model_dir, str(out / "data" / "eval.jsonl"), str(evals / f"{method}.results.json"),
                             ref=None if model_dir == sft else sft, judge=recorder, n=1,
                             temperatures=cfg.temperature_list(), max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed + 4, batch_size=cfg.eval_batch, max_prompt_length=cfg.max_prompt_length,
                             device=cfg.device, precision=cfg.precision,
                             samples_out=str(evals / f"{method}.samples.jsonl"), progress=cfg.progress)
    # one judge call per temperature, in order (n = 1: one outcome per prompt)
    temps = result["temperatures"]
    outcomes = recorder.calls if len(recorder.calls) == len(temps) else [None] * len(temps)
    return {"entries": [entry_of(method, None, e, o) for e, o in zip(temps, outcomes)],
            "kl": result.get("kl_mean", 0.0 if model_dir == sft else None), "kl_se": result.get("kl_se")}


def eval_best_of_n(cfg, out: Path, sft: str, rm: str, judge) -> list[dict]:
    """Best-of-N at every temperature above 0 (greedy decoding gives N copies of one answer)."""
    ns = cfg.bon_list()
    if not ns:
        return []
    models: dict = {}  # loaded on the first temperature not yet measured
    entries = []
    for t in (t for t in cfg.temperature_list() if t > 0):
        entries += resumable(out / "evals" / f"best_of_n_T{t:g}.json",
                             lambda: measure_best_of_n(cfg, out, sft, rm, judge, t, ns, models))
    return entries


def measure_best_of_n(cfg, out: Path, sft: str, rm: str, judge, t: float, ns: list[int], models: dict) -> list[dict]:
    from ...data.formats import write_jsonl
    from ...data.prompts import load_prompts
    from ...eval.evaluate import mean_se
    from ...eval.reward_model import RewardModel
    from ...eval.sample import draw_samples
    from ...models import load_model, load_tokenizer, pick_device

    if not models:
        models.update(tok=load_tokenizer(sft), policy=load_model(sft, pick_device(cfg.device)),
                      rm=RewardModel(rm, device=cfg.device, batch_size=cfg.eval_batch, precision=cfg.precision))
    items = load_prompts(str(out / "data" / "eval.jsonl"))
    k = max(ns)
    samples = draw_samples(models["policy"], models["tok"], items, k, cfg.max_new_tokens, t, 1.0, cfg.seed + 5,
                           cfg.eval_batch, cfg.max_prompt_length,
                           progress=f"Best-of-{k} samples T={t:g}" if cfg.progress else None)
    scores, lengths = models["rm"](samples.prompts, samples.texts), samples.lengths(models["tok"].eos_token_id)
    prompts, refs = [it.prompt for it in items], [it.reference for it in items]
    entries = []
    for n in ns:  # the first n of the k samples of each prompt: Best-of-n for every n from one draw
        picks = [max(range(i * k, i * k + n), key=lambda j: scores[j]) for i in range(len(items))]
        verdicts = judge.judge(prompts, [samples.texts[j] for j in picks], refs, clusters=list(range(len(items))))
        length, length_se = mean_se([lengths[j] for j in picks])
        entries.append({"method": "best_of_n", "knob": n, "temperature": t,
                        **{key: v for key, v in verdicts.summary().items() if key in ENTRY_KEYS},
                        "length_mean": length, "length_se": length_se, "outcomes": list(verdicts.outcomes)})
        if n == k:  # the picks shown side by side in the report
            write_jsonl(({"temperature": t, "prompt_index": i, "completion": samples.texts[j]}
                         for i, j in enumerate(picks)), out / "evals" / f"best_of_n_T{t:g}.samples.jsonl")
    return finite(entries)


def finite(obj):
    """NaN -> None (strict JSON), as `evaluate_policy` writes its results."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def reference_length(out: Path, sft: str) -> float:
    """Mean length in tokens (πSFT's tokenizer) of the eval prompts' references."""
    from ...models import load_tokenizer

    tok = load_tokenizer(sft)
    refs = [r["chosen"] if isinstance(r["chosen"], str) else "".join(m.get("content", "") for m in r["chosen"])
            for r in read_jsonl(out / "data" / "eval.jsonl")]
    return sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in refs) / max(len(refs), 1)


def side_by_side(cfg, out: Path, methods: list[str]) -> list[dict]:
    """The first `samples_shown` eval prompts with their reference and each method's answer at the
    lowest temperature evaluated (Best-of-N: the lowest above 0)."""
    rows = read_jsonl(out / "data" / "eval.jsonl")[:cfg.samples_shown]
    temps = cfg.temperature_list()
    shown = [{"prompt": r["prompt"], "reference": r["chosen"], "answers": {}} for r in rows]
    for method in methods:
        if method == "best_of_n":
            positive = [t for t in temps if t > 0]
            if not positive or not cfg.bon_list():
                continue
            t, label = min(positive), f"Best-of-{max(cfg.bon_list())}"
            path = out / "evals" / f"best_of_n_T{t:g}.samples.jsonl"
        else:
            t, label, path = min(temps), None, out / "evals" / f"{method}.samples.jsonl"
        if not path.exists():
            continue
        for s in read_jsonl(path):
            if s["temperature"] == t and s["prompt_index"] < len(shown) and s.get("index", 0) == 0:
                shown[s["prompt_index"]]["answers"][method] = {"temperature": t, "completion": s["completion"],
                                                               "label": label}
    return shown
