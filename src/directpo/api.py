"""The Python API: one function per job, the same jobs as the commands, on the same settings.

    import directpo

    result = directpo.train(model="my-sft-model", data="pairs.jsonl", output_dir="runs/dpo", beta=0.1,
                            max_steps=200, callbacks=[MyCallback()])
    result.train["rewards/accuracies"], result.metrics[-1], result.output_dir

Each job takes its settings object — the dataclass its command builds from the flags
(`TrainConfig`, `PipelineConfig`, `RewardModelConfig`, `PPOConfig`, `OnlineConfig`, `ScoreConfig`,
`SampleConfig`, `BonConfig`, `EvalConfig`, `InspectConfig`, `PlanConfig`, `MergeConfig`) — and/or the same
settings as keyword arguments (`lr=1e-6`: a keyword overrides the object's field). Settings are
checked as the command checks them; a mistake raises a `directpo.errors.UserError` (still a
`ValueError`/`OSError`) naming the setting, file or row (the CLI prints the same message as one
line); an unknown keyword is Python's `TypeError`.

The training jobs return a `RunResult` (the last metrics lines, every metrics record, where the
model is, the health alarms raised); `callbacks` (`Callback` subclasses) are called after each
step, evaluation and checkpoint and may stop the run early (it then finishes as a run that
reached its end: final model saved). The commands (`directpo train`, ...) are this module's
functions behind their flags.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from .errors import UserValueError
from .outputs import check_output_dir, check_outputs
from .runfiles import read_metrics, read_summary
from .training.config import TrainConfig
from .training.run import Callback

__all__ = ["Callback", "RunResult", "best_of_n", "evaluate", "inspect_data", "merge", "online", "pipeline", "plan",
           "ppo", "result_of", "sample", "score", "sft", "train", "train_reward_model"]


@dataclass
class RunResult:
    """What a training job leaves: its output folder, and what its run_complete.json records."""

    output_dir: Path
    summary: dict  # as in run_complete.json (the command prints part of it)
    train: dict = field(default_factory=dict)  # the last training step's metrics line
    eval: dict | None = None  # the last evaluation's, when there was one
    stopped_at: int | None = None  # the step a callback stopped the run at

    @classmethod
    def of(cls, summary: dict) -> "RunResult":
        return cls(Path(summary["output_dir"]), summary, summary.get("train") or {}, summary.get("eval"),
                   summary.get("stopped_at"))

    @property
    def metrics(self) -> list[dict]:
        """Every record of metrics.jsonl (training steps and evaluations, in order)."""
        return read_metrics(self.output_dir)

    @property
    def alerts(self) -> list[dict]:
        """The health alarms the run raised."""
        return self.summary.get("alerts") or []

    def load_model(self, **kwargs):
        """The trained model, as any Hugging Face tool loads it (`from_pretrained` on output_dir)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.output_dir, **kwargs)


def _settings(cls, config, settings: dict):
    """`config` (an instance of `cls`, or None) with `settings` applied on top, its number and
    true/false settings of their types."""
    if config is None:
        return _typed(cls(**settings))
    if not isinstance(config, cls):
        if not any(isinstance(config, base) for base in cls.__mro__[1:] if is_dataclass(base)):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        config = cls(**{f.name: getattr(config, f.name) for f in fields(config)})  # (a TrainConfig for a pipeline)
    return _typed(replace(config, **settings))


def _typed(cfg):
    """`cfg` with its int, float and bool settings read as a config file's are ("1e-6" a number), or a
    ConfigError naming the setting: the flags and YAML are converted, but a keyword is taken as given,
    and beta="high" failed deep in the loss with a TypeError naming nothing."""
    from .config import _base_type, convert, field_types

    types = field_types(type(cfg))
    typed = {f.name: convert(getattr(cfg, f.name), types[f.name], f.name, f.metadata.get("parse"))
             for f in fields(cfg) if getattr(cfg, f.name) is not None  # (a missing required one: validate's)
             and _base_type(types[f.name])[0] in ("int", "float", "bool")}
    return replace(cfg, **typed)


# ----------------------------------------------------------------------------------------------
# Training jobs


def train(config: TrainConfig | None = None, *, tokenizer=None, callbacks=(), **settings) -> RunResult:
    """DPO (or any `--loss`) on preference data: `directpo train`. Settings: `TrainConfig`'s.

    `model` and `ref` may be model objects instead of names (a `PreTrainedModel`, trained in place;
    a `PeftModel` goes on training its adapters, its reference the base model with them disabled),
    with `tokenizer` the tokenizer object to use; the run records the model's `name_or_path`.
    `data` and `eval_data` may be rows instead of a file: a list of dicts or a `datasets.Dataset`,
    in any row shape a file may hold (errors name "in-memory data, row N")."""
    from .training.loop import train as run
    from .training.prepare import Sources

    _rows(settings, "data", "in-memory data")
    _rows(settings, "eval_data", "in-memory eval data")
    sources = Sources(model=_object(settings, "model"), ref_model=_object(settings, "ref"), tokenizer=tokenizer)
    if sources.model is not None and tokenizer is None:
        raise UserValueError("a model object needs its tokenizer: pass tokenizer=...")
    return RunResult.of(run(_settings(TrainConfig, config, settings), callbacks, sources))


def _rows(settings: dict, name: str, label: str) -> None:
    """Rows given for data setting `name` (a list of dicts, a `datasets.Dataset`) become a `Rows`
    source, which the data readers read like a file (`data.readers.Rows`)."""
    from .data.readers import Rows

    value = settings.get(name)
    if value is not None and not isinstance(value, (str, os.PathLike)):
        settings[name] = Rows(value, label)


def _object(settings: dict, name: str):
    """The object given for setting `name` (taken out of `settings`, which keep its name), or None."""
    value = settings.get(name)
    if value is None or isinstance(value, (str, os.PathLike)):
        if value is not None:
            settings[name] = os.fspath(value)
        return None
    settings[name] = getattr(value, "name_or_path", "") or f"in-memory {name}"
    return value


def sft(config: TrainConfig | None = None, *, callbacks=(), **settings) -> RunResult:
    """Supervised fine-tuning on the chosen responses (Preferred-FT): `directpo sft`."""
    settings.setdefault("loss", "sft")
    return train(config, callbacks=callbacks, **settings)


def pipeline(config=None, **settings) -> dict:
    """The paper's recipe: Preferred-FT, then DPO against that SFT model (`directpo pipeline`);
    {"sft": ..., "dpo": ...} summaries, each stage in its own folder under output_dir. Settings:
    `PipelineConfig`'s (`TrainConfig`'s, and the SFT stage's own sft_lr, sft_max_steps, ...)."""
    from .training.config import PipelineConfig
    from .training.pipeline import run_pipeline

    return run_pipeline(_settings(PipelineConfig, config, settings))


def train_reward_model(config=None, *, callbacks=(), **settings) -> RunResult:
    """A Bradley–Terry reward model on preference pairs: `directpo rm`. Settings: `RewardModelConfig`'s."""
    from .rlhf.config import RewardModelConfig
    from .rlhf.reward_model import train_reward_model as run

    return RunResult.of(run(_settings(RewardModelConfig, config, settings), callbacks))


def ppo(config=None, *, reward=None, callbacks=(), **settings) -> RunResult:
    """PPO with a KL penalty: `directpo ppo`. `reward`: f(prompt, completion) -> float (or a batched
    scorer), instead of the settings' reward_model / reward_fn. Settings: `PPOConfig`'s."""
    from .rlhf.config import PPOConfig
    from .rlhf.ppo import ppo as run

    return RunResult.of(run(_settings(PPOConfig, config, settings), reward, callbacks))


def online(config=None, *, scorer=None, **settings) -> dict:
    """Online (iterative) DPO: `directpo online`; the rounds' summary. `scorer`: a batched reward
    instead of the settings' reward_fn / reward_model. Settings: `OnlineConfig`'s."""
    from .rlhf.online import OnlineConfig, run_online

    return run_online(_settings(OnlineConfig, config, settings), scorer)


def plan(config=None, **settings) -> dict:
    """The memory a run needs per device, from the model's config alone: `directpo plan`."""
    from .training.plan import PlanConfig, plan as run

    return run(_settings(PlanConfig, config, settings))


def merge(config=None, **settings) -> dict:
    """A LoRA adapter merged into its base, written tensor by tensor as a Hugging Face model folder
    (`directpo merge ADAPTER_DIR --out DIR`); what its merge_complete.json records. Settings:
    `MergeConfig`'s (`adapter`, `out`, `dtype`, `dequantize`, `overwrite`)."""
    from .training.merge import MergeConfig, merge as run

    return run(_settings(MergeConfig, config, settings))


def result_of(output_dir) -> RunResult:
    """The result of a finished run, from its folder (run_complete.json)."""
    return RunResult.of(read_summary(output_dir))


# ----------------------------------------------------------------------------------------------
# Scoring, sampling, evaluation, data


def score(config=None, **settings) -> dict:
    """Log-probs (and implicit rewards, given a reference) of every pair of a file: `directpo score`.
    Settings: `ScoreConfig`'s. Returns the summary the command prints."""
    from .eval.config import ScoreConfig
    from .eval.score import score as run

    cfg = _settings(ScoreConfig, config, settings).validate()
    check_outputs({"--out": cfg.out}, {"--data": cfg.data}, cfg.overwrite)
    return run(cfg.model, cfg.data, cfg.out, ref=cfg.ref, beta=cfg.beta, max_length=cfg.max_length,
               max_prompt_length=cfg.max_prompt_length, batch_size=cfg.batch_size, on_invalid=cfg.on_invalid,
               device=cfg.device, precision=cfg.precision, split=cfg.data_split, layout=cfg.layout,
               fixed_length=cfg.fixed_length)


def sample(config=None, **settings) -> dict:
    """Completions of a model for a prompt file, written as JSONL: `directpo sample`. Settings: `SampleConfig`'s."""
    from .eval.config import SampleConfig
    from .eval.sample import sample as run

    cfg = _settings(SampleConfig, config, settings).validate()
    check_outputs({"--out": cfg.out}, {"--prompts": cfg.prompts}, cfg.overwrite)
    return run(cfg.model, cfg.prompts, cfg.out, n=cfg.n, temperature=cfg.temperature, overwrite=cfg.overwrite,
               **cfg.sampling())


def best_of_n(config=None, *, reward=None, **settings) -> dict:
    """Best-of-N: N samples per prompt, scored, the best kept: `directpo bon`. `reward`: a scorer
    instead of the settings' reward_model / reward_fn. Settings: `BonConfig`'s."""
    from .eval.bon import best_of_n as run
    from .eval.config import BonConfig

    cfg = _settings(BonConfig, config, settings).validate()
    check_outputs({"--out": cfg.out}, {"--prompts": cfg.prompts}, cfg.overwrite)
    return run(cfg.model, cfg.prompts, cfg.out, cfg.n, reward or _scorer(cfg), temperature=cfg.temperature,
               overwrite=cfg.overwrite, reward_name=None if reward else cfg.reward_model or cfg.reward_fn,
               **cfg.sampling())


def evaluate(config=None, *, reward=None, judge=None, **settings) -> dict:
    """Reward, KL(π‖πref), length and win rate of a policy on held-out prompts, over a temperature
    sweep: `directpo eval`. `reward`: a scorer; `judge`: a judge (`directpo.eval.judge`), instead of
    the settings' own. Settings: `EvalConfig`'s. Returns everything the results file holds."""
    from .eval.config import EvalConfig
    from .eval.evaluate import evaluate_policy
    from .eval.judge import build_judge

    cfg = _settings(EvalConfig, config, settings).validate()
    template = cfg.judge_prompt if os.path.isfile(cfg.judge_prompt) else None  # a template file
    check_outputs({"--out": cfg.out, "--samples-out": cfg.samples_out, "--plot": cfg.plot},
                  {"--prompts": cfg.prompts, "--judge-prompt": template}, cfg.overwrite)
    if reward is None and judge is None:
        cfg.check_scorers()
    reward = reward if reward is not None else _scorer(cfg)
    judge = judge if judge is not None else build_judge(device=cfg.device, seed=cfg.seed, **cfg.judge())
    return evaluate_policy(cfg.model, cfg.prompts, cfg.out, ref=cfg.ref, reward=reward, judge=judge, n=cfg.n,
                           temperatures=cfg.sweep(), precision=cfg.precision, plot=cfg.plot,
                           samples_out=cfg.samples_out, **cfg.sampling())


def _scorer(cfg):
    """The reward of the settings' reward_model or reward_fn (None: neither)."""
    from .eval.scorers import load_reward_fn

    if cfg.reward_model is None and cfg.reward_fn is None:
        return None
    return load_reward_fn(cfg.reward_model, cfg.reward_fn, device=cfg.device, batch_size=cfg.batch_size)


def inspect_data(config=None, **settings) -> dict:
    """The data report of `directpo inspect` (shapes, invalid rows, duplicates, length bias,
    truncation, the reference's log-probs); written to `out` when set. Settings: `InspectConfig`'s."""
    from .inspect import inspect_data as run, write_report
    from .inspect.config import InspectConfig
    from .inspect.report import REPORT_FILES
    from .models import load_tokenizer

    cfg = _settings(InspectConfig, config, settings).validate()
    if cfg.out:  # a folder that may be written into, holding no report unless overwrite
        check_output_dir(cfg.out, {"--data": cfg.data, "--model": cfg.model, "--tokenizer": cfg.tokenizer},
                         cfg.overwrite, flag="--out", markers=REPORT_FILES, what="directpo report")
        check_outputs({"--out": os.path.join(cfg.out, name) for name in REPORT_FILES}, {}, cfg.overwrite)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    ins = run(cfg.data, tokenizer, model=cfg.model, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
              on_invalid=cfg.on_invalid, split=cfg.data_split, batch_size=cfg.batch_size, device=cfg.device,
              precision=cfg.precision, progress=cfg.progress, threads=cfg.threads)
    ins["report_files"] = write_report(ins, cfg.out) if cfg.out else []
    return ins
