"""Settings of `directpo experiment sentiment`: the study's dataclass (its fields are the flags) and presets.

Precedence: dataclass defaults < preset < YAML `--config` < command-line flags.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ...config import build_config, load_yaml, setting
from ...errors import UserValueError
from ..common import parse_numbers  # noqa: F401 (re-exported: runs, evaluation)

# What `--methods` accepts; online DPO (iterative: sample from the policy, label, DPO, repeat) is opt-in.
ALL_METHODS = ("dpo", "unlikelihood", "preferred_ft", "ppo", "ppo_gt", "best_of_n", "online_dpo")
DEFAULT_METHODS = ALL_METHODS[:-1]

PRESETS: dict[str, dict] = {
    # Every stage, tiny everything: for CI (< 3 min on 2 cores).
    "smoke": dict(hidden=32, layers=2, heads=2, vocab_size=400, max_corpus=1200, n_train_prompts=64,
                  n_eval_prompts=16, pretrain_epochs=2.0, pretrain_batch=32, max_new_tokens=12, batch_size=16,
                  dpo_betas="0.1,1.0", dpo_steps=4, ul_weights="1.0", ul_steps=4, pft_steps=4, rm_steps=4,
                  ppo_kl_coefs="0.1", ppo_gt_kl_coefs="0.1", ppo_steps=2, ppo_batch=16, ppo_mini_batch=8,
                  ppo_epochs=1, bon_ns="2,4", eval_points=2, eval_samples=2, eval_batch=32,
                  online_rounds=2, dpo_cover=0.0),  # coverage has its own test
    # 2 CPU cores, fp32 (this CPU has no fast bf16): ~1 h or more a seed with the equal-budget rule.
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
    """The controlled-sentiment study"""

    output_dir: str = setting(None, "where every stage's outputs and the report go", required=True)
    preset: str = setting("cpu-small", "sizes and budgets: smoke (CI), cpu-small (~1 h or more, 2 cores), paper (GPU)",
                          choices=list(PRESETS))
    corpus: str | None = setting(None, "review text: a .txt file (one text per line; SST's datasetSentences.txt is "
                                       "recognised), .jsonl/.json/.parquet, or a `datasets` name (default: the SST "
                                       "sentences shipped next to this checkout; not found: an error asking for --corpus)",
                                  input=True)
    corpus_field: str = setting("text", "field of a .jsonl/.parquet/`datasets` corpus holding the review text")
    max_corpus: int = setting(0, "use at most this many texts of the corpus (0: all)")
    base_model: str | None = setting(None, "a ready πSFT (hub id or directory): skips pretraining",
                                           input=True)
    init_model: str | None = setting(None, "fine-tune this model on the corpus to get πSFT (the paper: gpt2-large); "
                                           "default: a small Llama pretrained from scratch", input=True)
    hidden: int = setting(256, "from-scratch model: hidden size")
    layers: int = setting(4, "from-scratch model: layers")
    heads: int = setting(4, "from-scratch model: attention heads")
    vocab_size: int = setting(4096, "from-scratch model: BPE vocabulary trained on the corpus")
    pretrain_epochs: float = setting(3.0, "passes over the corpus for πSFT")
    pretrain_lr: float = setting(2e-3, "πSFT learning rate (AdamW, linear warm-up)")
    pretrain_batch: int = setting(64, "πSFT batch (texts)")
    max_length: int = setting(64, "max tokens of a text / prompt + completion")
    n_train_prompts: int = setting(1500, "prompts for preference pairs and PPO")
    n_eval_prompts: int = setting(256, "held-out prompts for evaluation (disjoint from the train prompts)")
    prompt_min_tokens: int = setting(2, "shortest prompt prefix (tokens)")
    prompt_max_tokens: int = setting(8, "longest prompt prefix (tokens)")
    samples_per_prompt: int = setting(4, "completions sampled from πSFT per train prompt to build pairs")
    max_new_tokens: int = setting(32, "completion length limit (sampling, PPO, evaluation)")
    pairs: str = setting("all", "pairs per prompt: all pairs above the margin, or best vs worst sample only",
                         choices=["best_worst", "all"])
    pair_margin: float = setting(0.05, "minimum reward difference for a pair")
    reward_model: str | None = setting(None, "ground truth: an HF sentiment classifier (P(positive)); default: VADER "
                                             "compound score (offline)", input=True)
    batch_size: int = setting(32, "pairs per step of DPO, Unlikelihood, Preferred-FT and the reward model")
    optimizer: str = setting("adamw", "optimizer of the preference runs", choices=["adamw", "rmsprop"])
    warmup_steps: int = setting(20, "warm-up steps of every training run")
    dpo_betas: str = setting("0.01,0.1,1.0", "DPO: β values (one run each; as many as every other method's "
                                            "settings)")
    dpo_steps: int = setting(160, "DPO: steps per run")
    dpo_lr: float = setting(1e-4, "DPO: learning rate")
    dpo_cover: float = setting(1.0, "the coverage rule, after every run: while a method of --cover-methods reaches a "
                                    "largest KL below this × the largest KL of the others, its furthest run trains "
                                    "on one checkpoint interval at a time and is evaluated (PPO-type: until its "
                                    "ground-truth reward plateaus or it has spent DPO's FLOPs; 0: off)", ge=0)
    cover_methods: str = setting("dpo,unlikelihood,ppo,ppo_gt", "the methods the coverage rule (--dpo-cover) "
                                 "applies to and compares, comma-separated")
    dpo_max_steps: int = setting(0, "the cap on a preference run's steps when trained on by the coverage rule "
                                    "(0: 3 × its steps)", ge=0)
    ul_weights: str = setting("0.5,1.0,2.0", "Unlikelihood: α values (weight of the rejected-token term)")
    ul_steps: int = setting(160, "Unlikelihood: steps per run")
    ul_lr: float = setting(1e-4, "Unlikelihood: learning rate")
    pft_steps: int = setting(160, "Preferred-FT: steps")
    pft_lr: float = setting(1e-4, "Preferred-FT: learning rate")
    rm_steps: int = setting(150, "reward model: steps")
    rm_lr: float = setting(1e-4, "reward model: learning rate")
    ppo_kl_coefs: str = setting("0.02,0.05,0.2", "PPO with the learned RM: KL coefficients (one run each)")
    ppo_gt_kl_coefs: str = setting("0.02,0.05,0.2", "PPO-GT (the scorer as reward): KL coefficients")
    ppo_steps: int = setting(40, "PPO: steps (rollout batches) per run")
    ppo_lr: float = setting(1e-4, "PPO: learning rate")
    ppo_batch: int = setting(64, "PPO: rollouts per step")
    ppo_mini_batch: int = setting(16, "PPO: rollouts per gradient step")
    ppo_epochs: int = setting(4, "PPO: passes over each rollout batch")
    bon_ns: str = setting("2,4,8,16", "Best-of-N: N values (samples of πSFT, picked by the learned RM)")
    methods: str = setting(",".join(DEFAULT_METHODS), "methods to run, comma-separated (πSFT is always evaluated): "
                                                      + ", ".join(ALL_METHODS))
    online_rounds: int = setting(3, "online DPO: rounds of sample → score → pair → DPO (each a point)")
    online_beta: float = setting(0.1, "online DPO: β")
    online_samples: int = setting(4, "online DPO: completions per train prompt and round, scored by the ground "
                                     "truth; best vs worst make the round's pair")
    online_ref: str = setting("round", "online DPO: πref of a round, its starting policy or πSFT",
                              choices=["round", "initial"])
    eval_points: int = setting(4, "checkpoints evaluated per run (evenly spaced, the last included)")
    eval_samples: int = setting(4, "samples per eval prompt")
    eval_batch: int = setting(256, "sequences generated/scored at once")
    seed: int = setting(0, "seed of every stage")
    seeds: str = setting("", "run the whole study once per seed (e.g. 0,1,2: prompts, samples, pairs, RM, runs), "
                             "each in OUTPUT_DIR/seed-S, and report them together in OUTPUT_DIR (overrides --seed)")
    check_seeds: str = setting("", "with --seeds: seeds run apart (each in OUTPUT_DIR/seed-S, e.g. `--seed S "
                                   "--output-dir OUTPUT_DIR/seed-S`), each of whose gaps is checked against the pooled "
                                   "seeds' 95 % prediction interval for a new seed (OUTPUT_DIR/check-seeds.md)")
    precision: str = setting("fp32", "bf16: autocast matmuls (fast on GPUs and AMX CPUs only); "
                             "auto: bf16 where this machine runs it faster",
                             choices=["fp32", "bf16", "auto"])
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    threads: int = setting(0, "CPU threads for torch (0: torch's default)")
    progress: bool = setting(True, "progress bars")
    fixed_length: bool = setting(False, "completions of exactly --max-new-tokens tokens for every method and the "
                                        "preference data: a length-neutral ground truth. EOS is suppressed in every "
                                        "sample after πSFT (pairs, Best-of-N, PPO's rollouts, the evaluations), and "
                                        "every log-prob is renormalised without it (DPO and its reference, the KL, "
                                        "PPO's ratios); πSFT and the reward model are trained as without it")
    report_only: bool = setting(False, "rewrite the report (summary.md, summary.json, points, plot; with --seeds, each "
                                       "seed's and the pooled one) from the points already in OUTPUT_DIR: nothing is "
                                       "trained or evaluated")

    def validate(self) -> "SentimentConfig":
        if self.output_dir is None:
            raise UserValueError("missing required setting --output-dir")
        if not 1 <= self.prompt_min_tokens <= self.prompt_max_tokens:
            raise UserValueError("need 1 ≤ prompt_min_tokens ≤ prompt_max_tokens")
        if self.eval_points < 1 or self.samples_per_prompt < 2:
            raise UserValueError("eval_points must be ≥ 1 and samples_per_prompt ≥ 2")
        bad_cover = set(self.cover_list()) - set(ALL_METHODS)
        if bad_cover:
            raise UserValueError(f"--cover-methods: unknown {', '.join(sorted(bad_cover))}; choose from "
                                 f"{', '.join(ALL_METHODS)}")
        unknown = set(self.method_list()) - set(ALL_METHODS)
        if unknown or not self.method_list():
            raise UserValueError(f"--methods: unknown {', '.join(sorted(unknown)) or '(none given)'}; choose from "
                                 f"{', '.join(ALL_METHODS)}")
        if self.online_rounds < 1 or self.online_samples < 2 or self.online_beta <= 0:
            raise UserValueError("need online_rounds ≥ 1, online_samples ≥ 2 and online_beta > 0")
        if self.dpo_cover < 0 or self.dpo_max_steps < 0:
            raise UserValueError("need dpo_cover ≥ 0 and dpo_max_steps ≥ 0")
        seeds = _seed_list(self.seeds, "seeds", "distinct whole numbers ≥ 0, e.g. 0,1,2")
        if self.check_seeds:
            if not self.seeds:
                raise UserValueError("--check-seeds needs --seeds: the seeds whose intervals the others are checked "
                                     "against")
            rule = f"whole numbers ≥ 0 not in --seeds ({self.seeds})"
            if set(_seed_list(self.check_seeds, "check_seeds", rule)) & set(seeds):
                raise UserValueError(f"--check-seeds: expected {rule}; got {self.check_seeds!r}")
        for name in ("dpo_betas", "ul_weights", "ppo_kl_coefs", "ppo_gt_kl_coefs", "bon_ns"):
            parse_numbers(getattr(self, name), name)
        return self

    def method_list(self) -> list[str]:
        return [m.strip() for m in str(self.methods).split(",") if m.strip()]

    def cover_list(self) -> list[str]:
        return [m.strip() for m in str(self.cover_methods).split(",") if m.strip()]

    def runs_method(self, method: str) -> bool:
        return method in self.method_list()


def _seed_list(text: str, name: str, rule: str) -> list[float]:
    """The seeds of setting `name` (empty: none): distinct whole numbers ≥ 0, else an error stating `rule`."""
    if not text:
        return []
    seeds = parse_numbers(text, name)
    if not seeds or any(x != int(x) or x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise UserValueError(f"--{name.replace('_', '-')}: expected {rule}; got {text!r}")
    return seeds


def recorded_config(out: Path) -> SentimentConfig:
    """The settings a study recorded in OUT/study_config.json (settings newer than the record at their
    defaults)."""
    known = {f.name for f in fields(SentimentConfig)}
    return SentimentConfig(**{k: v for k, v in json.loads((Path(out) / "study_config.json").read_text()).items()
                              if k in known})


def preset_defaults(name: str) -> dict:
    """The settings a preset changes, plus the preset's own name."""
    if name not in PRESETS:
        raise UserValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name], preset=name)


def sentiment_config(args) -> SentimentConfig:
    """The study's settings from parsed flags: dataclass defaults < preset < YAML < flags. The preset
    is the flag's, else the YAML file's, else cpu-small."""
    preset = getattr(args, "preset", None)
    if preset is None and getattr(args, "config", None):
        preset = load_yaml(args.config, SentimentConfig).get("preset")
    return build_config(args, SentimentConfig, **preset_defaults(preset or "cpu-small"))
