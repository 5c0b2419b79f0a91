"""Settings of `directpo score`, `sample`, `bon`, `eval` and `plot`: dataclasses whose fields are their
flags and YAML keys (see `directpo.config`).

    PlotConfig               `plot`
    OutputSettings           where it runs, what it may overwrite
    ├── ScoreConfig          `score`
    └── GenerationSettings   sampling: `sample`, `bon`, `eval`
        ├── SampleConfig
        ├── BonConfig        + RewardSettings
        └── EvalConfig       + RewardSettings, JudgeSettings

The flags' ranges are checked as they are read (`add_flags(..., check_ranges_early=True)`) and again,
with the YAML file's values, by `validate`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, FixedLengthSettings, check_settings, setting
from ..memory import parse_size
from ..errors import UserValueError
from ..precision import PRECISIONS
from .judge import ORDERS

ON_INVALID = ["error", "skip"]
# `directpo.data.collate.LAYOUTS`, whose module imports torch: written out here so that `--help` and
# a usage error load nothing heavy (tests/test_settings.py checks they agree).
LAYOUTS = ("packed", "padded")


def parse_temperatures(value) -> list[float]:
    """'0.25,0.5,0.75,1.0' (or a YAML list) -> [0.25, 0.5, 0.75, 1.0], each a finite number ≥ 0."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserValueError(f"expected comma-separated numbers, e.g. 0.25,0.5,0.75,1.0; got {text!r}") from None
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise UserValueError(f"expected temperatures ≥ 0, got {text!r}")
    return values


@dataclass
class OutputSettings:
    """Device and outputs"""

    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    overwrite: bool = setting(False, "replace output files that exist (never an input file); without it they are "
                                     "refused", switch="--overwrite")

    def validate(self):
        check_settings(self)
        return self


@dataclass
class ScoreConfig(OutputSettings, FixedLengthSettings):
    """Scoring preference pairs"""

    model: str = setting(None, "model to score with (hub id or local dir)", required=True, input=True)
    data: str = setting(None, "preference data (same formats as train)", required=True, input=True)
    out: str = setting(None, "output JSONL: one line per pair, in input order", required=True)
    ref: str | None = setting(None, "reference model: adds implicit rewards β·(log π − log πref)", input=True)
    beta: float = setting(0.1, "β of the implicit reward", gt=0)
    max_length: int | None = setting(512, "max tokens of prompt + response", ge=1)
    max_prompt_length: int | None = setting(None, "max prompt tokens (default: no limit)", ge=1)
    batch_size: int = setting(8, "pairs scored at once", ge=1)
    on_invalid: str = setting("error", "bad rows", choices=ON_INVALID)
    data_split: str | None = setting(None, "split name for `datasets` sources (default: train)")
    precision: str = setting("auto", "auto: bf16 where this device runs it fast, else fp32 (see `directpo train "
                                     "--help`)", choices=list(PRECISIONS))
    layout: str = setting("packed", "packed: each prompt computed once (exact); padded: one row per "
                                    "prompt+response", choices=list(LAYOUTS))


@dataclass
class PlotConfig:
    """Training curves"""

    run_dirs: list[str] = setting(None, "run directories (each with its metrics.jsonl; a metrics.jsonl file works "
                                        "too); several are overlaid, named by their directories", required=True,
                                  positional=True, nargs="+", metavar="RUN_DIR")
    out: str = setting(None, "image to write: .png (or .pdf, .svg): loss, reward accuracy, margin, chosen/rejected "
                             "rewards, PPO reward and KL, learning rate, gradient norm, as the runs have them; train "
                             "as lines, eval as markers", required=True)
    overwrite: bool = setting(False, "replace --out if it exists (never a run's metrics file); without it, it is "
                                     "refused", switch="--overwrite")

    def validate(self):
        check_settings(self)
        return self


@dataclass
class GenerationSettings(OutputSettings, FixedLengthSettings):
    """Sampling"""

    n: int = setting(1, "samples per prompt", ge=1)
    max_new_tokens: int = setting(128, "max tokens per completion", ge=1)
    temperature: float = setting(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = setting(1.0, "nucleus sampling threshold (1: off)", gt=0, le=1)
    seed: int = setting(0, "sampling seed (same settings, same samples)")
    batch_size: int = setting(16, "sequences generated / scored at once (with --memory-budget: scored at once; the "
                                  "sampling batch is chosen from the budget)", ge=1)
    memory_budget: str | None = setting(None, "choose the sampling batch (rows decoded at once) for this much "
                                              "memory, e.g. 8GiB or 512MiB: the largest whose peak (the process "
                                              "with its weights, the KV cache, the forward measured on the loaded "
                                              "model, the sampling step) fits; logged and recorded in the output "
                                              "(default: off)")
    max_prompt_length: int | None = setting(None, "max prompt tokens; longer prompts are cut from the left "
                                                  "(default: no limit)", ge=1)
    on_invalid: str = setting("error", "bad prompt rows", choices=ON_INVALID)
    data_split: str | None = setting(None, "split name for `datasets` sources (default: train)")
    progress: bool = setting(True, "show a progress bar", switch="--no-progress", switch_help="no progress bar")

    def validate(self):
        super().validate()
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "--memory-budget")
        return self

    def sampling(self) -> dict:
        """The keyword arguments of `sample`, `best_of_n` and `evaluate_policy` these settings give
        (`memory_budget`: the sampling batch is chosen from it, `batch_size` then scores)."""
        budget = self.memory_budget
        return dict(max_new_tokens=self.max_new_tokens, top_p=self.top_p, seed=self.seed,
                    batch_size=self.batch_size, max_prompt_length=self.max_prompt_length, device=self.device,
                    on_invalid=self.on_invalid, split=self.data_split, progress=self.progress, memory_budget=budget,
                    fixed_length=self.fixed_length)


@dataclass
class SampleConfig(GenerationSettings):
    """What to sample"""

    model: str = setting(None, "model to sample from (hub id or local dir)", required=True, input=True)
    prompts: str = setting(None, "JSONL with a 'prompt' field, or a preference file", required=True, input=True)
    out: str = setting(None, "output JSONL: prompt_index, index, prompt, completion", required=True)


@dataclass
class RewardSettings:
    """The reward"""

    reward_model: str | None = setting(None, "reward model directory (`directpo rm` output)", exclusive="reward",
                                       input=True)
    reward_fn: str | None = setting(None, "reward callable module:function, f(prompt, completion) -> float (module "
                                          "imported from sys.path, then the current directory); built in: "
                                          "directpo.eval.scorers:review_sentiment, "
                                          "directpo.eval.scorers:vader_sentiment", exclusive="reward")


@dataclass
class BonConfig(RewardSettings, GenerationSettings):
    """Best-of-N"""

    model: str = setting(None, "model to sample from", required=True, input=True)
    prompts: str = setting(None, "JSONL with a 'prompt' field, or a preference file", required=True, input=True)
    out: str = setting(None, "output JSONL: one line per prompt, best completion and all rewards", required=True)
    n: int = setting(None, "samples per prompt (N)", required=True, ge=1)

    def validate(self):
        super().validate()
        if self.reward_model is None and self.reward_fn is None:
            raise ConfigError("one of the arguments --reward-model --reward-fn is required")
        return self


@dataclass
class JudgeSettings:
    """The win-rate judge (at most one of --judge-url, --judge-reward-model, --judge-classifier)"""

    judge_url: str | None = setting(None, "OpenAI-compatible endpoint base URL (POST {url}/chat/completions); API "
                                          "key from DIRECTPO_JUDGE_API_KEY or OPENAI_API_KEY", exclusive="judge")
    judge_reward_model: str | None = setting(None, "judge locally with a reward model (`directpo rm` output): "
                                                   "higher wins; not an LLM judge", exclusive="judge", metavar="DIR",
                                             input=True)
    judge_classifier: str | None = setting(None, "judge locally with a Hugging Face sequence classifier: higher "
                                                 "P(--judge-classifier-label) wins (a one-output model: higher "
                                                 "logit); not an LLM judge", exclusive="judge", metavar="NAME_OR_DIR")
    judge_classifier_label: str | None = setting(None, "the classifier's 'good' class, by name or index (default: "
                                                       "the class named 'positive')")
    judge_model: str | None = setting(None, "model name sent to the judge endpoint")
    judge_prompt: str = setting("dialogue", "judge prompt: dialogue, summary (the paper's GPT-4 prompts), or a "
                                            "template file with {query}, {a}, {b}")
    judge_order: str = setting("swap", "swap: ask each comparison in both orders (disagreeing verdicts are a tie); "
                                       "random: once, the policy's side a seeded coin flip", choices=list(ORDERS))
    judge_workers: int = setting(4, "parallel judge requests", ge=1)
    judge_timeout: float = setting(60.0, "seconds per judge request, a wall-clock deadline: connect, send and the "
                                         "whole reply (a deadline failure, retried)", gt=0)
    judge_max_reply_bytes: int = setting(1 << 20, "largest judge reply read, in bytes; a larger one is abandoned "
                                                  "unread (a reply_too_large failure, not retried)", ge=1024)
    judge_retries: int = setting(3, "retries of a judge call after a connection error, the --judge-timeout "
                                    "deadline or HTTP 408/429/5xx", ge=0)
    judge_backoff: float = setting(1.0, "seconds before the first retry, doubling (jittered, at most 30; a "
                                        "Retry-After is honoured)", ge=0)
    judge_max_failure_rate: float = setting(0.1, "stop with an error when more than this fraction of the "
                                                 "comparisons fail after retries", ge=0, lt=1)

    def judge(self) -> dict:
        """The keyword arguments of `directpo.eval.judge.build_judge` (but `device` and `seed`)."""
        return dict(url=self.judge_url, model=self.judge_model, prompt=self.judge_prompt,
                    reward_model=self.judge_reward_model, classifier=self.judge_classifier,
                    classifier_label=self.judge_classifier_label, order=self.judge_order, retries=self.judge_retries,
                    backoff=self.judge_backoff, max_failure_rate=self.judge_max_failure_rate,
                    timeout=self.judge_timeout, workers=self.judge_workers,
                    max_reply_bytes=self.judge_max_reply_bytes)


@dataclass
class EvalConfig(JudgeSettings, RewardSettings, GenerationSettings):
    """The policy, its reference, the prompts, the temperature sweep"""

    model: str = setting(None, "the policy π", required=True, input=True)
    ref: str = setting(None, "the reference πref of the KL (same tokenizer)", required=True, input=True)
    prompts: str = setting(None, "prompts; a preference file's chosen responses (or a 'reference' field) are the "
                                 "references for win rates", required=True, input=True)
    out: str = setting(None, "results JSON", required=True)
    temperatures: list[float] | None = setting(None, "comma-separated sweep, e.g. 0.25,0.5,0.75,1.0 (default: "
                                                     "--temperature)", parse=parse_temperatures)
    plot: str | None = setting(None, "PNG of reward / win rate / length against temperature")
    samples_out: str | None = setting(None, "also write every sample (and its reward) to this JSONL")
    precision: str = setting("auto", "log-prob precision (KL); auto: bf16 where this device runs it fast, else fp32",
                             choices=list(PRECISIONS))

    def sweep(self) -> list[float]:
        """The temperatures evaluated: --temperatures, else --temperature alone."""
        return list(self.temperatures) if self.temperatures is not None else [self.temperature]

    def check_scorers(self) -> None:
        """Something to score or judge the samples with, and --judge-model only for --judge-url."""
        local_judge = self.judge_reward_model or self.judge_classifier
        if self.reward_model is None and self.reward_fn is None and self.judge_url is None and not local_judge:
            raise ConfigError("give --reward-model, --reward-fn or --judge-url (with --judge-model), or a local "
                              "judge: --judge-reward-model or --judge-classifier")
        if self.judge_model and not self.judge_url:
            raise ConfigError("--judge-model names the model of --judge-url; give --judge-url too")
