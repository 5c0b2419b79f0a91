"""Settings of `directpo experiment dialogue` and `directpo experiment summarize`: one dataclass for
the study (its fields are the flags), a subclass per task, and each task's presets.

Precedence: dataclass defaults < preset < YAML `--config` < command-line flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigError, build_config, check_ranges, load_yaml, setting
from ..common import parse_numbers

ALL_TEMPERATURES = "0,0.25,0.5,0.75,1.0"

# Every stage on a tiny model (CI): shared by both tasks' smoke presets.
_SMOKE = dict(hidden=32, layers=2, heads=2, vocab_size=400, max_rows=200, n_eval_prompts=8, pretrain_epochs=1.0,
              pretrain_batch=64, pretrain_lr=2e-3, max_length=128, max_prompt_length=96, max_new_tokens=12,
              batch_size=16, micro_batch_size=16, optimizer="adamw", warmup_steps=1, sft_steps=3, sft_lr=1e-3,
              rm_steps=3, rm_lr=1e-3, dpo_steps=3, dpo_lr=1e-3, ppo_steps=2, ppo_batch=8, ppo_mini_batch=4,
              ppo_epochs=1, ppo_lr=1e-4, bon_ns="2", temperatures="0,1.0", eval_batch=32, samples_shown=2,
              judge_steps=3, judge_lr=1e-3, judge_floor=0.0)  # CI: a 3-step judge, never a result

# The paper's optimisation (§B): RMSprop, lr 1e-6, batch 64, 150 warm-up steps, one epoch; full
# fine-tuning in one process on one GPU (bf16 autocast, fp32 master weights).
_PAPER = dict(optimizer="rmsprop", batch_size=64, warmup_steps=150, sft_lr=1e-6, dpo_lr=1e-6, rm_lr=5e-6,
              sft_steps=0, dpo_steps=0, rm_steps=0, epochs=1.0, ppo_steps=400, ppo_batch=64, ppo_epochs=4,
              ppo_lr=1e-6, ppo_kl_coef=0.05, bon_ns="128", temperatures=ALL_TEMPERATURES, n_eval_prompts=256,
              eval_batch=64, precision="bf16")

DIALOGUE_PRESETS: dict[str, dict] = {
    "smoke": dict(_SMOKE),
    # On 2 CPU cores, offline, on the 2,312 HH-RLHF pairs shipped in ../shared (fp32: this CPU has no
    # fast bf16). 512 held-out prompts need multi-turn prompts too (the single-turn subset has 662
    # pairs): the prompt is the conversation up to the last Assistant turn. The other 1,798 rows are
    # split by prompt, half to the judge (a reward model of its own, from the base LM) and half to the
    # policies (πSFT, DPO, PPO and the reward model of Best-of-N and PPO). The from-scratch model is
    # pretrained on every transcript of the file except the eval prompts' conversations. Step times
    # measured on a busy 2-core machine (1 thread: pretraining 6 s/step, SFT 3 s, reward model 7 s,
    # DPO 5 s; Best-of-16 sampling 226 s per 128 prompts and temperature) and measured for the first
    # stages (pretraining, 336 steps: 30 min at nice 19 beside other jobs; SFT 2.6 min; the judge
    # 50 steps ≈ 8 min with its evaluations) say ≈ 10 more min of reward model and DPO, a few of PPO
    # (20 steps of 32 rollouts) and ≈ 15–20 min of evaluation (three policies at three temperatures
    # and Best-of-4 at two, 512 prompts each): ≈ 60–75 min a seed on a busy machine, an estimate
    # (summary.json has each stage's seconds). The judge measured 54.5 % held-out accuracy there,
    # below the 0.65 floor: the study stops after the judge stage unless --force.
    # Micro-batches of 8: the reward model pads each micro-batch to its longest pair, and smaller
    # ones of similar lengths halve its step time.
    "cpu-small": dict(single_turn=False, n_eval_prompts=512, judge_fraction=0.5, hidden=256, layers=4, heads=4,
                      vocab_size=4096, pretrain_epochs=3.0, pretrain_batch=32, pretrain_lr=2e-3, max_length=160,
                      max_prompt_length=96, max_new_tokens=48, batch_size=32, micro_batch_size=8, optimizer="adamw",
                      warmup_steps=10, sft_steps=60, sft_lr=3e-4, rm_steps=50, rm_lr=1e-4, judge_steps=50,
                      judge_lr=1e-4, dpo_steps=80, dpo_lr=1e-4, ppo_steps=20, ppo_batch=32, ppo_mini_batch=8,
                      ppo_epochs=2, ppo_lr=1e-5, ppo_kl_coef=0.05, bon_ns="4", temperatures="0,0.5,1.0",
                      eval_batch=128),
    # §6.2 (Fig. 3 left): Pythia-2.8B on Anthropic HH, single-turn subset, β 0.1; needs the network and a GPU.
    # Rows the library cannot pair (e.g. identical chosen and rejected) are skipped and counted in the report.
    "paper": dict(_PAPER, data="Anthropic/hh-rlhf:train", eval_data="Anthropic/hh-rlhf:test", single_turn=True,
                  on_invalid="skip", base_model="EleutherAI/pythia-2.8b", beta=0.1, micro_batch_size=8,
                  ppo_mini_batch=8,
                  max_length=512, max_prompt_length=256, max_new_tokens=256),
}

SUMMARIZE_PRESETS: dict[str, dict] = {
    # Every stage on a tiny model, on SYNTHETIC comparisons in the TL;DR format (no download).
    "smoke": dict(_SMOKE, synthetic_data=240, max_length=160, max_prompt_length=128),
    # §6.2 (Fig. 2 right): GPT-J-6B on Reddit TL;DR comparisons, β 0.5; needs the network and a GPU
    # (≈ 100 GB for full fine-tuning: an H200, or an 80 GB card with a smaller --micro-batch-size and luck).
    "paper": dict(_PAPER, data="openai/summarize_from_feedback:train",
                  eval_data="openai/summarize_from_feedback:validation", data_config="comparisons",
                  on_invalid="skip", base_model="EleutherAI/gpt-j-6b", beta=0.5, micro_batch_size=4, ppo_mini_batch=4,
                  max_length=640, max_prompt_length=512, max_new_tokens=64),
}


@dataclass
class WinrateConfig:
    """The win-rate study"""

    TASK: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict]] = {}

    output_dir: str = setting(None, "where every stage's outputs and the report go", required=True)
    data: str | None = setting(None, "preference data: a file or a hub id (`name:split` picks a split)",
                                     input=True)
    eval_data: str | None = setting(None, "held-out data whose prompts (and chosen responses, the references) are "
                                          "evaluated; default: prompts of --data held out from training", input=True)
    max_rows: int = setting(0, "read at most this many rows of --data (0: all)", ge=0)
    on_invalid: str = setting("error", "bad rows: stop with an error naming file/row/field, or skip them (counted)",
                              choices=["error", "skip"])
    n_eval_prompts: int = setting(128, "held-out prompts evaluated (disjoint from every training prompt)", ge=1)
    base_model: str | None = setting(None, "the pretrained LM fine-tuned first on the chosen responses (hub id or "
                                           "directory); default: a small Llama pretrained here on the data's text",
                                           input=True)
    hidden: int = setting(256, "from-scratch model: hidden size", ge=1)
    layers: int = setting(4, "from-scratch model: layers", ge=1)
    heads: int = setting(4, "from-scratch model: attention heads", ge=1)
    vocab_size: int = setting(4096, "from-scratch model: BPE vocabulary trained on the training text", ge=64)
    pretrain_epochs: float = setting(2.0, "from-scratch model: passes over the training text", gt=0)
    pretrain_lr: float = setting(2e-3, "from-scratch model: learning rate (AdamW, linear warm-up)", gt=0)
    pretrain_batch: int = setting(32, "from-scratch model: texts per step", ge=1)
    max_length: int = setting(512, "max tokens of prompt + response (training)", ge=8)
    max_prompt_length: int = setting(256, "max prompt tokens (cut from the left) in training and sampling", ge=1)
    optimizer: str = setting("adamw", "optimizer of SFT, DPO and the reward model", choices=["adamw", "rmsprop"])
    batch_size: int = setting(64, "pairs per step of SFT, DPO and the reward model", ge=1)
    micro_batch_size: int = setting(8, "pairs per forward/backward (accumulated to --batch-size)", ge=1)
    warmup_steps: int = setting(150, "linear warm-up steps of SFT, DPO and the reward model", ge=0)
    epochs: float = setting(1.0, "passes over the training pairs of a run whose --*-steps is 0", gt=0)
    sft_steps: int = setting(0, "Preferred-FT (SFT on the chosen responses): steps (0: --epochs)", ge=0)
    sft_lr: float = setting(1e-6, "Preferred-FT: learning rate", gt=0)
    beta: float = setting(0.1, "DPO: β", gt=0)
    dpo_steps: int = setting(0, "DPO: steps (0: --epochs)", ge=0)
    dpo_lr: float = setting(1e-6, "DPO: learning rate", gt=0)
    rm_steps: int = setting(0, "reward model (Best-of-N, PPO and the default judge): steps (0: --epochs)", ge=0)
    rm_lr: float = setting(5e-6, "reward model: learning rate", gt=0)
    judge_fraction: float = setting(0.5, "the local reward-model judge: the share of the training prompts (after the "
                                         "eval prompts are held out) whose pairs train the judge only, never DPO, "
                                         "PPO or their reward model (0: the judge is the policy's reward model; no "
                                         "split with --judge-url/--judge-classifier)", ge=0)
    judge_steps: int = setting(0, "the judge's reward model: steps on the judge's pairs (0: --epochs)", ge=0)
    judge_lr: float = setting(5e-6, "the judge's reward model: learning rate", gt=0)
    judge_init: str = setting("base", "the judge's reward model starts from the base LM (it never saw a preference "
                                      "label) or from πSFT (fine-tuned on the policy's chosen answers)",
                              choices=["base", "sft"])
    ppo_steps: int = setting(0, "PPO with the learned reward model: steps (rollout batches; 0: no PPO)", ge=0)
    ppo_lr: float = setting(1e-6, "PPO: learning rate", gt=0)
    ppo_kl_coef: float = setting(0.05, "PPO: KL coefficient", ge=0)
    ppo_batch: int = setting(64, "PPO: rollouts per step", ge=1)
    ppo_mini_batch: int = setting(8, "PPO: rollouts per gradient step", ge=1)
    ppo_epochs: int = setting(4, "PPO: passes over each rollout batch", ge=1)
    bon_ns: str = setting("4,16", "Best-of-N: N values (samples of πSFT picked by the learned reward model; one "
                                  "set of max(N) samples per temperature; empty: no Best-of-N)")
    temperatures: str = setting(ALL_TEMPERATURES, "sampling temperatures of the evaluation (one sample per prompt)")
    max_new_tokens: int = setting(128, "completion length limit (sampling, PPO, evaluation)", ge=1)
    eval_batch: int = setting(64, "sequences generated/scored at once", ge=1)
    judge_url: str | None = setting(None, "win-rate judge: an OpenAI-compatible endpoint (POST {url}/chat/"
                                          "completions; key from DIRECTPO_JUDGE_API_KEY), e.g. GPT-4 as in the paper")
    judge_model: str | None = setting(None, "the endpoint's model name (with --judge-url)")
    judge_classifier: str | None = setting(None, "win-rate judge: an HF sequence classifier (higher score wins); "
                                                 "default judge: a reward model trained here on the judge's own "
                                                 "pairs (--judge-fraction)")
    judge_floor: float = setting(0.65, "the least held-out pair accuracy of a judge whose win rates are reported: a "
                                       "reward-model judge measured below it is refused (0: no floor)", ge=0)
    force: bool = setting(False, "report win rates from a judge below --judge-floor anyway (marked so; every "
                                 "finding 'not testable here')")
    report_only: bool = setting(False, "rewrite summary.md and winrate.png from points.json and summary.json "
                                       "already in OUTPUT_DIR: nothing is trained, sampled or judged")
    samples_shown: int = setting(3, "side-by-side samples in summary.md", ge=0)
    seed: int = setting(0, "seed of every stage")
    seeds: str = setting("", "run the whole study once per seed (e.g. 0,1,2) into OUTPUT_DIR/seed-S, then a pooled "
                             "report in OUTPUT_DIR: win rates with t-intervals over seeds, paired differences pooled")
    precision: str = setting("fp32", "bf16: autocast matmuls (fast on GPUs and AMX CPUs only); "
                             "auto: bf16 where this machine runs it faster",
                             choices=["fp32", "bf16", "auto"])
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    threads: int = setting(0, "CPU threads for torch (0: torch's default)", ge=0)
    progress: bool = setting(True, "progress bars")

    def validate(self) -> "WinrateConfig":
        if self.output_dir is None:
            raise ConfigError("missing required setting --output-dir")
        check_ranges(self)
        if self.preset not in self.PRESETS:
            raise ConfigError(f"--preset: {self.preset!r} is not one of {', '.join(self.PRESETS)}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}")
        if not self.temperature_list():
            raise ConfigError("--temperatures: give at least one")
        if any(t < 0 for t in self.temperature_list()):
            raise ConfigError(f"--temperatures: must be ≥ 0, got {self.temperatures}")
        if any(n < 1 for n in self.bon_list()):
            raise ConfigError(f"--bon-ns: N must be ≥ 1, got {self.bon_ns}")
        if self.judge_url and not self.judge_model:
            raise ConfigError("--judge-url needs --judge-model (the endpoint's model name)")
        if self.judge_floor > 1:
            raise ConfigError(f"--judge-floor: an accuracy between 0 and 1, got {self.judge_floor:g}")
        if self.seeds:
            seeds = parse_numbers(self.seeds, "seeds")
            if not seeds or any(x != int(x) or x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
                raise ConfigError(f"--seeds: expected distinct whole numbers ≥ 0, e.g. 0,1,2; got {self.seeds!r}")
        if self.judge_fraction >= 1:
            raise ConfigError(f"--judge-fraction: a share below 1 (the policies need pairs too), got "
                              f"{self.judge_fraction:g}")
        if self.judge_url and self.judge_classifier:
            raise ConfigError("give one judge: --judge-url or --judge-classifier, not both")
        return self

    def own_judge(self) -> bool:
        """Whether the judge is a reward model trained here on its own split (not the policy's)."""
        return not (self.judge_url or self.judge_classifier) and self.judge_fraction > 0

    def temperature_list(self) -> list[float]:
        return parse_numbers(self.temperatures, "temperatures")

    def bon_list(self) -> list[int]:
        values = parse_numbers(self.bon_ns, "bon_ns")
        if any(n != int(n) for n in values):
            raise ConfigError(f"--bon-ns: N must be whole numbers, got {self.bon_ns}")
        return sorted({int(n) for n in values})


@dataclass
class DialogueConfig(WinrateConfig):
    """Single-turn dialogue (Anthropic HH)"""

    TASK: ClassVar[str] = "dialogue"
    PRESETS: ClassVar[dict[str, dict]] = DIALOGUE_PRESETS

    preset: str = setting("cpu-small", "sizes and budgets: smoke (CI), cpu-small (≤ 60 min, 2 cores, offline), "
                                       "paper (Pythia-2.8B on HH, GPU)", choices=list(DIALOGUE_PRESETS))
    single_turn: bool = setting(False, "keep only rows whose prompt holds a single Human turn (the paper's subset)")


@dataclass
class SummarizeConfig(WinrateConfig):
    """Summarization (Reddit TL;DR)"""

    TASK: ClassVar[str] = "summarize"
    PRESETS: ClassVar[dict[str, dict]] = SUMMARIZE_PRESETS

    preset: str | None = setting(None, "sizes and budgets: smoke (CI, synthetic TL;DR-format data), paper (GPT-J-6B "
                                       "on TL;DR comparisons, GPU); required", choices=list(SUMMARIZE_PRESETS))
    data_config: str | None = setting("comparisons", "config of a hub --data/--eval-data (summarize_from_feedback: "
                                                     "comparisons)")
    synthetic_data: int = setting(0, "no --data: generate this many SYNTHETIC comparisons in the TL;DR format "
                                     "(smoke tests only; not a result)", ge=0)


def preset_defaults(cls, name: str | None) -> dict:
    """The settings preset `name` of `cls`'s task changes, plus the preset's own name."""
    if name is None:
        raise ConfigError(f"--preset: choose one of {', '.join(cls.PRESETS)} (`directpo experiment {cls.TASK} "
                          "--help` says what each runs)")
    if name not in cls.PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} for {cls.TASK} (known: {', '.join(cls.PRESETS)})")
    return dict(cls.PRESETS[name], preset=name)


def winrate_config(args, cls):
    """The study's settings from parsed flags: dataclass defaults < preset < YAML < flags. The preset
    is the flag's, else the YAML file's, else the task's default."""
    preset = getattr(args, "preset", None)
    if preset is None and getattr(args, "config", None):
        preset = load_yaml(args.config, cls).get("preset")
    default = next(f.default for f in cls.__dataclass_fields__.values() if f.name == "preset")
    return build_config(args, cls, **preset_defaults(cls, preset or default))
