"""`directpo experiment sentiment`: the paper's controlled-sentiment study (§6.1, Fig. 2 left).

x is the first 2–8 tokens of a movie review, and the policy must continue it with positive
sentiment; a sentiment scorer is the ground-truth reward. Every method starts from the same πSFT
and is measured by the reward it reaches against its KL(π‖πSFT). The stages, each through the
library's own commands/APIs and each resumable (a killed study continues where it stopped):

  1 corpus      review text -> pretraining set, held-out LM set, two disjoint prompt pools
  2 sft         πSFT: a given model, or a small Llama pretrained here on the corpus (`train`, loss sft)
  3 prompts     2–8-token prefixes of held-out reviews: train prompts, disjoint eval prompts
  4 pairs       N samples per train prompt from πSFT, labelled by the scorer (best vs worst)
  5 rm          a Bradley–Terry reward model on the pairs (`directpo rm`)
  6 baselines   πSFT itself, and Best-of-N of πSFT picked by the RM (KL = log N − (N−1)/N)
  7 runs        DPO over β; Unlikelihood; Preferred-FT (`train`); PPO with the RM and PPO-GT with the
                scorer over KL coefficients (`ppo`); each saves several checkpoints, each evaluated on
                the eval prompts (`directpo eval`: ground-truth reward, KL from samples of π, length)
  8 report      points.json / points.csv, frontier.png, summary.md (frontier areas with error bars)

Presets: `smoke` (every stage on a tiny model, CI), `cpu-small` (≤ 60 min on 2 CPU cores),
`paper` (gpt2-large fine-tuned on IMDb, the siebert classifier, on a GPU). Any preset value can be
overridden by its flag.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..train.config import _f

PRESETS: dict[str, dict] = {
    # Every stage, tiny everything: for CI (< 3 min on 2 cores).
    "smoke": dict(hidden=32, layers=2, heads=2, vocab_size=400, max_corpus=1200, n_train_prompts=64,
                  n_eval_prompts=16, pretrain_epochs=2.0, pretrain_batch=32, max_new_tokens=12, batch_size=16,
                  dpo_betas="0.1,1.0", dpo_steps=4, ul_weights="1.0", ul_steps=4, pft_steps=4, rm_steps=4,
                  ppo_kl_coefs="0.1", ppo_gt_kl_coefs="0.1", ppo_steps=2, ppo_batch=16, ppo_mini_batch=8,
                  ppo_epochs=1, bon_ns="2,4", eval_points=2, eval_samples=2, eval_batch=32),
    # The issue's budget: ≤ 60 min on 2 CPU cores, fp32 (this CPU has no fast bf16).
    "cpu-small": dict(),
    # The paper's scale: needs the network (IMDb, gpt2-large, the siebert classifier) and a GPU.
    "paper": dict(corpus="stanfordnlp/imdb", corpus_field="text", init_model="gpt2-large",
                  reward_model="siebert/sentiment-roberta-large-english", max_corpus=0, pretrain_epochs=1.0,
                  pretrain_lr=1e-5, pretrain_batch=64, max_length=256, n_train_prompts=12000, n_eval_prompts=500,
                  max_new_tokens=64, samples_per_prompt=4, batch_size=64, optimizer="rmsprop",
                  dpo_betas="0.05,0.1,0.5,1.0", dpo_steps=600, dpo_lr=1e-6, ul_weights="0.1,1.0", ul_steps=600,
                  ul_lr=1e-6, pft_steps=600, pft_lr=1e-6, rm_steps=600, rm_lr=1e-5,
                  ppo_kl_coefs="0.02,0.05,0.1,0.2", ppo_gt_kl_coefs="0.02,0.05,0.1,0.2", ppo_steps=300,
                  ppo_lr=1e-6, ppo_batch=64, ppo_mini_batch=16, bon_ns="4,16,64,128", eval_points=4,
                  eval_samples=4, eval_batch=64, precision="bf16", warmup_steps=150),
}


@dataclass
class SentimentConfig:
    output_dir: str = _f(None, "where every stage's outputs and the report go", required=True)
    preset: str = _f("cpu-small", "sizes and budgets: smoke (CI), cpu-small (≤ 60 min, 2 cores), paper (GPU)",
                     choices=list(PRESETS))
    corpus: str | None = _f(None, "review text: a .txt file (one text per line; SST's datasetSentences.txt is "
                                  "recognised), .jsonl/.json/.parquet, or a `datasets` name (default: the SST "
                                  "sentences shipped next to this checkout, else stanfordnlp/imdb)")
    corpus_field: str = _f("text", "field of a .jsonl/.parquet/`datasets` corpus holding the review text")
    max_corpus: int = _f(0, "use at most this many texts of the corpus (0: all)")
    base_model: str | None = _f(None, "a ready πSFT (hub id or directory): skips pretraining")
    init_model: str | None = _f(None, "fine-tune this model on the corpus to get πSFT (the paper: gpt2-large); "
                                      "default: a small Llama pretrained from scratch")
    hidden: int = _f(256, "from-scratch model: hidden size")
    layers: int = _f(4, "from-scratch model: layers")
    heads: int = _f(4, "from-scratch model: attention heads")
    vocab_size: int = _f(4096, "from-scratch model: BPE vocabulary trained on the corpus")
    pretrain_epochs: float = _f(3.0, "passes over the corpus for πSFT")
    pretrain_lr: float = _f(2e-3, "πSFT learning rate (AdamW, linear warm-up)")
    pretrain_batch: int = _f(64, "πSFT batch (texts)")
    max_length: int = _f(64, "max tokens of a text / prompt + completion")
    n_train_prompts: int = _f(1500, "prompts for preference pairs and PPO")
    n_eval_prompts: int = _f(256, "held-out prompts for evaluation (disjoint from the train prompts)")
    prompt_min_tokens: int = _f(2, "shortest prompt prefix (tokens)")
    prompt_max_tokens: int = _f(8, "longest prompt prefix (tokens)")
    samples_per_prompt: int = _f(4, "completions sampled from πSFT per train prompt to build pairs")
    max_new_tokens: int = _f(32, "completion length limit (sampling, PPO, evaluation)")
    pairs: str = _f("all", "pairs per prompt: all pairs above the margin, or best vs worst sample only",
                    choices=["best_worst", "all"])
    pair_margin: float = _f(0.05, "minimum reward difference for a pair")
    reward_model: str | None = _f(None, "ground truth: an HF sentiment classifier (P(positive)); default: VADER "
                                        "compound score (offline)")
    batch_size: int = _f(32, "pairs per step of DPO, Unlikelihood, Preferred-FT and the reward model")
    optimizer: str = _f("adamw", "optimizer of the preference runs", choices=["adamw", "rmsprop"])
    warmup_steps: int = _f(20, "warm-up steps of every training run")
    dpo_betas: str = _f("0.05,0.1,0.5,1.0", "DPO: β values (one run each)")
    dpo_steps: int = _f(160, "DPO: steps per run")
    dpo_lr: float = _f(1e-4, "DPO: learning rate")
    ul_weights: str = _f("1.0", "Unlikelihood: α values (weight of the rejected-token term)")
    ul_steps: int = _f(160, "Unlikelihood: steps per run")
    ul_lr: float = _f(1e-4, "Unlikelihood: learning rate")
    pft_steps: int = _f(160, "Preferred-FT: steps")
    pft_lr: float = _f(1e-4, "Preferred-FT: learning rate")
    rm_steps: int = _f(150, "reward model: steps")
    rm_lr: float = _f(1e-4, "reward model: learning rate")
    ppo_kl_coefs: str = _f("0.05,0.2", "PPO with the learned RM: KL coefficients (one run each)")
    ppo_gt_kl_coefs: str = _f("0.05,0.2", "PPO-GT (the scorer as reward): KL coefficients")
    ppo_steps: int = _f(40, "PPO: steps (rollout batches) per run")
    ppo_lr: float = _f(1e-4, "PPO: learning rate")
    ppo_batch: int = _f(64, "PPO: rollouts per step")
    ppo_mini_batch: int = _f(16, "PPO: rollouts per gradient step")
    ppo_epochs: int = _f(4, "PPO: passes over each rollout batch")
    bon_ns: str = _f("2,4,8,16", "Best-of-N: N values (samples of πSFT, picked by the learned RM)")
    eval_points: int = _f(4, "checkpoints evaluated per run (evenly spaced, the last included)")
    eval_samples: int = _f(4, "samples per eval prompt")
    eval_batch: int = _f(256, "sequences generated/scored at once")
    seed: int = _f(0, "seed of every stage")
    precision: str = _f("fp32", "bf16: autocast matmuls (fast on GPUs and AMX CPUs only)", choices=["fp32", "bf16"])
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    progress: bool = _f(True, "progress bars")

    def validate(self) -> "SentimentConfig":
        if self.output_dir is None:
            raise ValueError("missing required setting --output-dir")
        if not 1 <= self.prompt_min_tokens <= self.prompt_max_tokens:
            raise ValueError("need 1 ≤ prompt_min_tokens ≤ prompt_max_tokens")
        if self.eval_points < 1 or self.samples_per_prompt < 2:
            raise ValueError("eval_points must be ≥ 1 and samples_per_prompt ≥ 2")
        for name in ("dpo_betas", "ul_weights", "ppo_kl_coefs", "ppo_gt_kl_coefs", "bon_ns"):
            _floats(getattr(self, name), name)
        return self


def preset_defaults(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name], preset=name)


def _floats(s: str, name: str) -> list[float]:
    try:
        return [float(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: expected comma-separated numbers, got {s!r}") from None


def log(msg: str) -> None:
    print(f"[directpo] sentiment: {msg}", file=sys.stderr, flush=True)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def write_jsonl(rows, path: Path) -> None:
    from ..eval.sampling import write_jsonl as write  # atomic: a killed stage leaves no half file

    write(rows, path)


# ----------------------------------------------------------------------------------------------
# 1. Corpus

_SST_FIXES = {"-LRB-": "(", "-RRB-": ")", "\\/": "/", "``": '"', "''": '"'}


def _clean(text: str) -> str:
    """Undo SST's tokenisation artefacts and mojibake; collapse whitespace."""
    if "Ã" in text:
        try:
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    for a, b in _SST_FIXES.items():
        text = text.replace(a, b)
    text = re.sub(r" (['’]s|n't|'re|'ve|'ll|'d|'m|[.,;:!?%)])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    text = re.sub(r"<br\s*/?>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def default_corpus() -> str:
    here = Path(__file__).resolve()
    for base in dict.fromkeys((Path.cwd(), *Path.cwd().parents, *here.parents)):  # from cwd or this checkout
        p = base / "shared" / "data" / "sst" / "datasetSentences.txt"
        if p.exists():
            return str(p)
    return "stanfordnlp/imdb"


def read_corpus(spec: str, field: str = "text") -> list[str]:
    """Review texts of a .txt file (SST's `index<TAB>sentence` lines recognised), or of any source
    `directpo.data` reads (the `field` of each row). Empty texts are an error naming the row."""
    from ..data.formats import DataError, read_records

    if spec.endswith(".txt"):
        if not Path(spec).exists():
            raise DataError(spec, None, None, "no such file")
        lines = Path(spec).read_text(encoding="utf-8", errors="replace").splitlines()
        sst = bool(lines) and lines[0].strip() == "sentence_index\tsentence"
        texts = [ln.split("\t", 1)[1] if sst else ln for ln in (lines[1:] if sst else lines)]
        return [_clean(t) for t in texts if t.strip()]
    texts = []
    for row, rec in read_records(spec, "train"):
        if isinstance(rec, DataError):
            raise rec
        value = rec.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(spec, row, field, "missing or empty: every corpus row needs its review text "
                                              f"(choose the field with --corpus-field)", kind="missing")
        texts.append(_clean(value))
    return texts


def stage_corpus(cfg: SentimentConfig, out: Path) -> dict:
    d = out / "corpus"
    if (d / "done.json").exists():
        return json.loads((d / "done.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    spec = cfg.corpus or default_corpus()
    texts = list(dict.fromkeys(t for t in read_corpus(spec, cfg.corpus_field) if len(t.split()) >= 4))
    random.Random(cfg.seed).shuffle(texts)
    if cfg.max_corpus:
        texts = texts[:cfg.max_corpus]
    # Prompt pools take whole reviews away from pretraining: prompts are prefixes of unseen reviews.
    n_ev, n_tr = 2 * cfg.n_eval_prompts, int(1.5 * cfg.n_train_prompts)
    n_lm = max(16, len(texts) // 50)
    if len(texts) < n_ev + n_tr + n_lm + 64:
        raise ValueError(f"{spec}: {len(texts)} usable texts, too few for {cfg.n_train_prompts} train and "
                         f"{cfg.n_eval_prompts} eval prompts plus pretraining; lower the prompt counts")
    pools = {"eval_pool": texts[:n_ev], "train_pool": texts[n_ev:n_ev + n_tr],
             "lm_heldout": texts[n_ev + n_tr:n_ev + n_tr + n_lm], "pretrain": texts[n_ev + n_tr + n_lm:]}
    for name, rows in pools.items():
        write_jsonl(({"prompt": "", "completion": t} for t in rows), d / f"{name}.jsonl")
    info = {"corpus": spec, "texts": len(texts), **{k: len(v) for k, v in pools.items()}}
    (d / "done.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# 2. πSFT

def _train_cfg(**kw):
    from ..train.config import TrainConfig

    return TrainConfig(**kw)


def _train_resumable(cfg_kw: dict) -> dict:
    """`train` that continues a killed run from its last checkpoint (and skips a finished one)."""
    from ..train.loop import COMPLETE_MARKER, train

    out = Path(cfg_kw["output_dir"])
    if (out / COMPLETE_MARKER).exists():
        return json.loads((out / COMPLETE_MARKER).read_text())
    return train(_train_cfg(resume="latest", **cfg_kw))


def _common(cfg: SentimentConfig) -> dict:
    return dict(precision=cfg.precision, device=cfg.device, threads=cfg.threads, seed=cfg.seed,
                progress=cfg.progress, log_every=10 ** 9, max_length=cfg.max_length)


def stage_sft(cfg: SentimentConfig, out: Path) -> dict:
    if cfg.base_model:
        return {"sft": cfg.base_model, "pretrained": False}
    c = out / "corpus"
    sft = out / "sft"
    init = cfg.init_model
    if init is None:
        from ..toy import build_tiny_model

        init_dir = out / "init"
        if not (init_dir / "config.json").exists():
            texts = [r["completion"] for r in _read_jsonl(c / "pretrain.jsonl")]
            build_tiny_model(init_dir, texts, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                             vocab_size=cfg.vocab_size, seed=cfg.seed, add_bos=True)
        init = str(init_dir)
    steps_per_epoch = math.ceil(sum(1 for _ in open(c / "pretrain.jsonl")) / cfg.pretrain_batch)
    total = max(1, round(cfg.pretrain_epochs * steps_per_epoch))
    _train_resumable(dict(model=init, data=str(c / "pretrain.jsonl"), output_dir=str(sft), loss="sft",
                          optimizer="adamw", lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch,
                          micro_batch_size=cfg.pretrain_batch, max_steps=total, warmup_steps=min(100, total // 10),
                          save_every=max(1, total // 4), keep_last=1, **_common(cfg)))
    ppl = perplexity(str(sft), c / "lm_heldout.jsonl", cfg)
    return {"sft": str(sft), "pretrained": True, "steps": total, "heldout_perplexity": ppl}


def perplexity(model_dir: str, path: Path, cfg: SentimentConfig) -> float:
    """exp(token-level NLL) of held-out texts, EOS included."""
    from ..eval.evaluate import completion_logps
    from ..models import load_model, load_tokenizer, pick_device

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, pick_device(cfg.device))
    texts = [r["completion"] for r in _read_jsonl(path)]
    start = tok("")["input_ids"] or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    comps = [tok(t, add_special_tokens=False)["input_ids"][:cfg.max_length - len(start) - 1] + [tok.eos_token_id]
             for t in texts]
    lp = completion_logps(model, [start] * len(comps), comps, tok.pad_token_id, cfg.eval_batch)
    return math.exp(-lp.sum().item() / sum(len(x) for x in comps))


# ----------------------------------------------------------------------------------------------
# 3. Prompts

def stage_prompts(cfg: SentimentConfig, out: Path, sft: str) -> dict:
    from ..models import load_tokenizer

    d = out / "prompts"
    if (d / "done.json").exists():
        return json.loads((d / "done.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(sft)
    rng = random.Random(cfg.seed + 1)

    def prefixes(pool: str, n: int, exclude: set) -> list[str]:
        got: list[str] = []
        for r in _read_jsonl(out / "corpus" / f"{pool}.jsonl"):
            ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
            k = rng.randint(cfg.prompt_min_tokens, cfg.prompt_max_tokens)
            if len(ids) < k + 3:
                continue  # too short to leave a continuation worth judging
            # k tokens, then the rest of the word the last one is part of: no prompt ends mid-word
            text, p = r["completion"], tok.decode(ids[:k])
            if text.startswith(p):
                p += re.match(r"\S*", text[len(p):]).group(0)
            p = p.rstrip()
            if p and p not in exclude and p not in got:
                got.append(p)
            if len(got) == n:
                break
        if len(got) < n:
            raise ValueError(f"only {len(got)} distinct prompts from the {pool} texts, {n} asked; lower the count")
        return got

    train = prefixes("train_pool", cfg.n_train_prompts, set())
    evals = prefixes("eval_pool", cfg.n_eval_prompts, set(train))  # disjoint from the train prompts
    write_jsonl(({"prompt": p} for p in train), d / "train.jsonl")
    write_jsonl(({"prompt": p} for p in evals), d / "eval.jsonl")
    info = {"train": len(train), "eval": len(evals), "examples": evals[:5]}
    (d / "done.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# 4. Preference pairs

def stage_pairs(cfg: SentimentConfig, out: Path, sft: str, scorer) -> dict:
    from ..eval.sampling import draw_samples, load_prompts
    from ..models import load_model, load_tokenizer, pick_device

    d = out / "pairs"
    if (d / "done.json").exists():
        return json.loads((d / "done.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    items = load_prompts(str(out / "prompts" / "train.jsonl"))
    tok = load_tokenizer(sft)
    model = load_model(sft, pick_device(cfg.device))
    n = cfg.samples_per_prompt
    s = draw_samples(model, tok, items, n, cfg.max_new_tokens, 1.0, 1.0, cfg.seed + 2, cfg.eval_batch,
                     progress="sampling πSFT for pairs" if cfg.progress else None)
    rewards = scorer(s.prompts, s.texts)
    rows, spreads = [], []
    for i, it in enumerate(items):
        rs, texts = rewards[i * n:(i + 1) * n], s.texts[i * n:(i + 1) * n]
        spreads.append(max(rs) - min(rs))
        # An empty sample (EOS first) has no tokens to train on: it cannot be either side of a pair.
        order = sorted((j for j in range(n) if texts[j].strip()), key=lambda j: -rs[j])
        if len(order) < 2:
            continue
        cands = [(order[0], order[-1])] if cfg.pairs == "best_worst" else \
            [(a, b) for x, a in enumerate(order) for b in order[x + 1:]]
        for a, b in cands:
            if rs[a] - rs[b] >= cfg.pair_margin and texts[a] != texts[b]:
                rows.append({"prompt": it.prompt, "chosen": texts[a], "rejected": texts[b],
                             "chosen_reward": rs[a], "rejected_reward": rs[b]})
    if len(rows) < 8:
        raise ValueError(f"only {len(rows)} pairs with a reward gap ≥ {cfg.pair_margin}: the scorer does not tell "
                         "πSFT's samples apart; lower --pair-margin or sample more per prompt")
    random.Random(cfg.seed + 3).shuffle(rows)
    n_held = max(4, len(rows) // 10)  # held-out pairs: the reward model's accuracy
    write_jsonl(rows[n_held:], d / "train.jsonl")
    write_jsonl(rows[:n_held], d / "heldout.jsonl")
    info = {"pairs": len(rows) - n_held, "heldout_pairs": n_held, "samples": len(s.texts),
            "median_spread": statistics.median(spreads), "sft_sample_reward": statistics.fmean(rewards),
            "empty_samples": sum(not t.strip() for t in s.texts)}
    (d / "done.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# 5–6. Reward model and the methods' runs

def stage_rm(cfg: SentimentConfig, out: Path, sft: str) -> dict:
    from ..rlhf.reward_model import train_reward_model
    from ..train.loop import COMPLETE_MARKER

    rm = out / "rm"
    if not (rm / COMPLETE_MARKER).exists():
        train_reward_model(_train_cfg(model=sft, data=str(out / "pairs" / "train.jsonl"),
                                      eval_data=str(out / "pairs" / "heldout.jsonl"), output_dir=str(rm),
                                      optimizer="adamw", lr=cfg.rm_lr, batch_size=cfg.batch_size,
                                      micro_batch_size=cfg.batch_size, max_steps=cfg.rm_steps,
                                      warmup_steps=cfg.warmup_steps, overwrite=True,
                                      **_common(cfg)))
    evals = [json.loads(x) for x in open(rm / "metrics.jsonl") if '"eval"' in x]
    return {"rm": str(rm), "heldout_accuracy": evals[-1].get("accuracy") if evals else None}


@dataclass
class Run:
    method: str  # dpo, unlikelihood, preferred_ft, ppo, ppo_gt
    knob: float | None
    steps: int

    @property
    def name(self) -> str:
        return self.method if self.knob is None else f"{self.method}_{self.knob:g}"


def plan_runs(cfg: SentimentConfig) -> list[Run]:
    runs = [Run("dpo", b, cfg.dpo_steps) for b in _floats(cfg.dpo_betas, "dpo_betas")]
    runs += [Run("unlikelihood", a, cfg.ul_steps) for a in _floats(cfg.ul_weights, "ul_weights")]
    runs += [Run("preferred_ft", None, cfg.pft_steps)]
    runs += [Run("ppo", k, cfg.ppo_steps) for k in _floats(cfg.ppo_kl_coefs, "ppo_kl_coefs")]
    runs += [Run("ppo_gt", k, cfg.ppo_steps) for k in _floats(cfg.ppo_gt_kl_coefs, "ppo_gt_kl_coefs")]
    return runs


def _every(steps: int, points: int) -> int:
    return max(1, steps // points)


def run_method(cfg: SentimentConfig, out: Path, sft: str, run: Run, scorer) -> None:
    from ..rlhf.config import PPOConfig
    from ..rlhf.ppo import ppo
    from ..train.loop import COMPLETE_MARKER

    d = out / "runs" / run.name
    pairs = str(out / "pairs" / "train.jsonl")
    every = _every(run.steps, cfg.eval_points)
    if run.method in ("dpo", "unlikelihood", "preferred_ft"):
        lr = {"dpo": cfg.dpo_lr, "unlikelihood": cfg.ul_lr, "preferred_ft": cfg.pft_lr}[run.method]
        extra = {"dpo": {"loss": "dpo", "beta": run.knob, "ref": sft},
                 "unlikelihood": {"loss": "unlikelihood", "unlikelihood_weight": run.knob},
                 "preferred_ft": {"loss": "sft"}}[run.method]
        _train_resumable(dict(model=sft, data=pairs, output_dir=str(d), optimizer=cfg.optimizer, lr=lr,
                              batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, max_steps=run.steps,
                              warmup_steps=cfg.warmup_steps, save_every=every, **extra,
                              **_common(cfg)))
        return
    if (d / COMPLETE_MARKER).exists():
        return
    # PPO has no mid-run resume: a killed PPO run starts again (its snapshots are rewritten).
    reward = scorer if run.method == "ppo_gt" else None  # PPO-GT: the ground truth itself
    kw = dict(reward_model=str(out / "rm")) if run.method == "ppo" else {}
    ppo(PPOConfig(model=sft, prompts=str(out / "prompts" / "train.jsonl"), output_dir=str(d), kl_coef=run.knob,
                  lr=cfg.ppo_lr, batch_size=cfg.ppo_batch, mini_batch_size=cfg.ppo_mini_batch,
                  ppo_epochs=cfg.ppo_epochs, max_steps=run.steps, max_new_tokens=cfg.max_new_tokens,
                  snapshot_every=every, seed=cfg.seed, precision=cfg.precision, device=cfg.device,
                  threads=cfg.threads, overwrite=True, progress=cfg.progress, log_every=10 ** 9,
                  generation_batch_size=cfg.eval_batch, **kw), reward=reward)


def checkpoints_of(run_dir: Path, run: Run, cfg: SentimentConfig) -> list[tuple[int, Path]]:
    """(step, where its weights are) for the evaluated points of a finished run, the final model last."""
    every = _every(run.steps, cfg.eval_points)
    steps = [s for s in range(every, run.steps, every)][-(cfg.eval_points - 1):] if cfg.eval_points > 1 else []
    if run.method.startswith("ppo"):
        found = [(s, run_dir / "snapshots" / f"step-{s}") for s in steps]
    else:
        found = [(s, run_dir / "checkpoints" / f"step-{s:08d}") for s in steps]
    return [(s, p) for s, p in found if p.exists()] + [(run.steps, run_dir)]


def export_checkpoint(ckpt: Path, base: str, dest: Path) -> Path:
    """A training checkpoint (trainable weights only) as a loadable HF model directory."""
    from safetensors.torch import load_file

    from ..models import load_model, load_tokenizer

    model = load_model(base, "cpu")
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    if unexpected:
        raise ValueError(f"{ckpt}: weights {unexpected[:3]} do not belong to {base}")
    model.save_pretrained(dest)
    load_tokenizer(base).save_pretrained(dest)
    return dest


# ----------------------------------------------------------------------------------------------
# 7. Evaluation

def _point_path(out: Path, method: str, knob, step: int) -> Path:
    return out / "evals" / f"{method}_{knob}_{step}.json"


def eval_point(cfg: SentimentConfig, out: Path, sft: str, scorer, method: str, knob, step: int,
               model_dir: str) -> dict:
    from ..eval.evaluate import evaluate

    path = _point_path(out, method, knob, step)
    if not path.exists():
        r = evaluate(model_dir, str(out / "prompts" / "eval.jsonl"), str(path) + ".tmp", ref=sft, reward=scorer,
                     n=cfg.eval_samples, temperatures=[1.0], max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 4,
                     batch_size=cfg.eval_batch, device=cfg.device, precision=cfg.precision, progress=False)
        point = {"method": method, "knob": knob, "step": step, "kl": r["kl_mean"], "kl_se": r["kl_se"],
                 "reward": r["reward_mean"], "reward_se": r["reward_se"], "length": r["length_mean"]}
        Path(str(path) + ".tmp").unlink()
        path.write_text(json.dumps(point))
    return json.loads(path.read_text())


def eval_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, scorer) -> list[dict]:
    points = []
    run_dir = out / "runs" / run.name
    for step, where in checkpoints_of(run_dir, run, cfg):
        done = _point_path(out, run.method, run.knob, step)
        if done.exists():  # evaluated before the study was stopped: no export needed
            points.append(json.loads(done.read_text()))
            continue
        tmp = None
        if (where / "model.safetensors").exists() and not (where / "config.json").exists():
            tmp = export_checkpoint(where, sft, out / "evals" / f".export-{run.name}-{step}")
            where = tmp
        try:
            points.append(eval_point(cfg, out, sft, scorer, run.method, run.knob, step, str(where)))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return points


def eval_best_of_n(cfg: SentimentConfig, out: Path, sft: str, scorer) -> list[dict]:
    """Best-of-N of πSFT picked by the learned RM: one set of max(N) samples, its first N per prompt."""
    from ..eval.bon import bon_kl
    from ..eval.evaluate import mean_se
    from ..eval.sampling import draw_samples, load_prompts
    from ..models import load_model, load_tokenizer, pick_device
    from ..rlhf.reward_model import RewardModel

    path = out / "evals" / "best_of_n.json"
    if path.exists():
        return json.loads(path.read_text())
    ns = [int(x) for x in _floats(cfg.bon_ns, "bon_ns")]
    items = load_prompts(str(out / "prompts" / "eval.jsonl"))
    tok = load_tokenizer(sft)
    s = draw_samples(load_model(sft, pick_device(cfg.device)), tok, items, max(ns), cfg.max_new_tokens, 1.0, 1.0,
                     cfg.seed + 5, cfg.eval_batch, progress="sampling for Best-of-N" if cfg.progress else None)
    rm = RewardModel(str(out / "rm"), device=cfg.device, batch_size=cfg.eval_batch, precision=cfg.precision)
    rm_scores, gt = rm(s.prompts, s.texts), scorer(s.prompts, s.texts)
    lengths = s.lengths(tok.eos_token_id)
    points = []
    for n in ns:
        picks = [max(range(i * max(ns), i * max(ns) + n), key=lambda k: rm_scores[k]) for i in range(len(items))]
        r, r_se = mean_se([gt[k] for k in picks])
        points.append({"method": "best_of_n", "knob": n, "step": 0, "kl": bon_kl(n), "kl_se": 0.0, "reward": r,
                       "reward_se": r_se, "length": statistics.fmean(lengths[k] for k in picks)})
    path.write_text(json.dumps(points))
    return points


# ----------------------------------------------------------------------------------------------
# The study

def ground_truth(cfg: SentimentConfig):
    from ..rlhf.rewards import ClassifierReward, callable_scorer, vader_sentiment

    if cfg.reward_model:
        return callable_scorer(ClassifierReward(cfg.reward_model, device=cfg.device, batch_size=cfg.eval_batch),
                               cfg.reward_model)
    scorer = callable_scorer(vader_sentiment, "vader")
    scorer([""], ["a good test"])  # fail now, not after pretraining, if vaderSentiment is missing
    return scorer


def run_sentiment(cfg: SentimentConfig) -> dict:
    import torch

    from .frontier import markdown, plot_frontier, summarize, write_points

    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (out / "study_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    scorer = ground_truth(cfg)
    runs = plan_runs(cfg)
    n_stages = 8

    def stage(i: int, name: str, fn, *args):
        log(f"stage {i}/{n_stages}: {name}  ({time.perf_counter() - t0:.0f} s so far)")
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return result

    info: dict = {}
    info["corpus"] = stage(1, "corpus", stage_corpus, cfg, out)
    info["sft"] = stage(2, "πSFT", stage_sft, cfg, out)
    sft = info["sft"]["sft"]
    info["prompts"] = stage(3, "prompts", stage_prompts, cfg, out, sft)
    info["pairs"] = stage(4, "preference pairs", stage_pairs, cfg, out, sft, scorer)
    info["rm"] = stage(5, "reward model", stage_rm, cfg, out, sft)
    (out / "evals").mkdir(exist_ok=True)
    points = stage(6, "evaluate πSFT", lambda: [eval_point(cfg, out, sft, scorer, "sft", None, 0, sft)])
    points += stage(6, "Best-of-N", eval_best_of_n, cfg, out, sft, scorer)
    # Each run is evaluated as soon as it is trained: its points are on disk before the next starts.
    for k, run in enumerate(runs, 1):
        stage(7, f"run {k}/{len(runs)} {run.name}: train", run_method, cfg, out, sft, run, scorer)
        points += stage(7, f"run {k}/{len(runs)} {run.name}: evaluate", eval_run, cfg, out, sft, run, scorer)

    log(f"stage 8/{n_stages}: report")
    comparisons = summarize(points)
    write_points(points, out)
    plot_frontier(points, out / "frontier.png", title=f"controlled sentiment ({cfg.preset}): reward vs KL")
    header = _header(cfg, info, time.perf_counter() - t0)
    (out / "summary.md").write_text(markdown(points, comparisons, header))
    result = {"output_dir": str(out), "points": len(points), "comparisons": comparisons, "info": info,
              "timings_s": timings, "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    for m, c in comparisons.items():
        log(f"DPO vs {m}: {c['diff']:+.3f} ± {c['diff_se']:.3f} over KL 0–{c['kl_range']:.2f} -> DPO {c['verdict']} "
            f"{m}")
    log(f"done in {time.perf_counter() - t0:.0f} s -> {out / 'summary.md'}")
    return result


def _header(cfg: SentimentConfig, info: dict, seconds: float) -> str:
    gt = cfg.reward_model or "VADER compound score of prompt + completion (vaderSentiment)"
    sft = info["sft"]
    lines = [f"# Controlled sentiment generation — preset `{cfg.preset}`", "",
             "The paper's §6.1 / Fig. 2 (left), reproduced by `directpo experiment sentiment`.", "",
             f"- corpus: {info['corpus']['corpus']} ({info['corpus']['texts']} texts)",
             f"- πSFT: {_rel(sft['sft'], cfg.output_dir)}" + (f", pretrained here ({sft['steps']} steps), held-out perplexity "
                                      f"{sft['heldout_perplexity']:.1f}" if sft.get("pretrained") else ""),
             f"- ground-truth reward: {gt}",
             f"- prompts: {info['prompts']['train']} train, {info['prompts']['eval']} eval (disjoint), "
             f"{cfg.prompt_min_tokens}–{cfg.prompt_max_tokens}-token prefixes of held-out reviews",
             f"- pairs: {info['pairs']['pairs']} ({cfg.pairs}, margin {cfg.pair_margin}) from "
             f"{cfg.samples_per_prompt} samples per prompt; median within-prompt reward spread "
             f"{info['pairs']['median_spread']:.2f}",
             f"- reward model: held-out pair accuracy {_fmt(info['rm']['heldout_accuracy'])}",
             f"- evaluation: {cfg.eval_samples} samples × {info['prompts']['eval']} eval prompts per point, "
             f"≤ {cfg.max_new_tokens} new tokens, temperature 1; KL(π‖πSFT) from samples of π; Best-of-N KL is "
             "the analytic log N − (N−1)/N",
             f"- total time: {seconds / 60:.1f} min", "", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _rel(path: str, root: str) -> str:
    """`sft` for OUTPUT/sft: the report does not depend on where the study ran."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def sentiment_config(args, build_config) -> SentimentConfig:
    """Config = dataclass defaults < preset < YAML < flags."""
    preset = getattr(args, "preset", None)
    if preset is None and getattr(args, "config", None):
        import yaml

        preset = (yaml.safe_load(open(args.config)) or {}).get("preset")
    return build_config(args, SentimentConfig, **preset_defaults(preset or "cpu-small"))

