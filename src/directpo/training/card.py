"""A model card (README.md) next to a run's weights. (Uploading the run with it: `hub`.)

    write_model_card(out_dir, settings, result, command_line, data_summary, alerts) -> out_dir/README.md
    invoked_command_line() -> this process's `directpo ...` arguments, or None
    recorded_alerts(out_dir) -> the alarms the run's metrics.jsonl lines carry

The card is what someone finding the model needs: the metadata the Hub indexes (`base_model`,
`library_name: directpo`, tags, `datasets`), the method and its parameters (β and the loss for
`train`; the reward model's and PPO's own settings for `rm` and `ppo`), the data, the final train
and eval metrics, the alarms the run raised, and the command line that reproduces it. `settings`
is the run's directpo_config.json, `result` its run_complete.json.

The Hub rejects a `base_model` that is not a Hub id, so a local starting model is followed
through the directpo_config.json it holds (a DPO run from a local SFT run names the SFT run's own
base) and left out of the metadata when no Hub id is recorded; the card's text names the path.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from numbers import Real
from pathlib import Path

from ..data.readers import is_hub_id as readers_is_hub_id
from ..losses import LOSS_SETTINGS, LOSSES, LossSpec, get_loss
from ..runfiles import CONFIG_FILE as SETTINGS_FILE
from ..runfiles import METRICS_FILE, read_metrics

CARD_FILE = "README.md"
_METHOD = {
    "sft": "Supervised fine-tuning: the negative log-likelihood of the target responses (Preferred-FT: the "
           "preferred response of each pair)",
    "rm": "A Bradley–Terry reward model: the language model with a scalar head, trained so that "
          "σ(r(x, y_chosen) − r(x, y_rejected)) is the probability of the preference, its rewards then shifted to "
          "mean 0 over the training responses",
    "ppo": "PPO (Schulman et al., 2017) against a reward, with a KL penalty to the reference policy: the reward "
           "r(x, y) − β·(log πθ(y|x) − log πref(y|x)) of the paper's eq. 3",
}


def is_hub_id(name: str | None) -> bool:
    """`name` or `owner/name` of [A-Za-z0-9._-], not a local path nor a file name."""
    return bool(name) and readers_is_hub_id(name) and not os.path.exists(os.path.expanduser(name))


def base_model_id(model: str | None, _depth: int = 0) -> str | None:
    """The Hub id a run started from: `model` itself when it is one; for a local directory that
    holds a directpo run, the model that run started from (followed); else None."""
    if model is None or _depth > 8:
        return None
    if is_hub_id(model):
        return model
    recorded = Path(os.path.expanduser(model)) / SETTINGS_FILE
    try:
        return base_model_id(json.loads(recorded.read_text()).get("model"), _depth + 1)
    except (OSError, ValueError, AttributeError):
        return None


def dataset_id(data: str | None) -> str | None:
    """A Hub dataset id from a `--data` value (`name`, `owner/name`, `owner/name:split`), else None."""
    if not data:
        return None
    base = data.split(":", 1)[0] if ":" in data.rsplit("/", 1)[-1] else data
    return base if is_hub_id(base) else None


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "—"
    if isinstance(v, Real):
        return f"{v:.4g}"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _tags(settings: dict) -> list[str]:
    command = settings.get("command", "train")
    if command == "rm":
        tags = ["directpo", "reward-model"]
    elif command == "ppo":
        tags = ["directpo", "ppo", "rlhf"]
    elif command == "sft":
        tags = ["directpo", "sft"]
    else:
        tags = ["dpo", "directpo", settings.get("loss") or "dpo"]
    if settings.get("lora_r") and not settings.get("merge"):
        tags += ["lora", "peft"]
    return list(dict.fromkeys(tags))


def card_data(settings: dict):
    """The card's YAML metadata (huggingface_hub.ModelCardData)."""
    from huggingface_hub import ModelCardData

    base = base_model_id(settings.get("model"))
    data = dataset_id(settings.get("data") if settings.get("command") != "ppo" else settings.get("prompts"))
    pipeline = "text-classification" if settings.get("command") == "rm" else "text-generation"
    return ModelCardData(base_model=base, library_name="directpo", tags=_tags(settings),
                         datasets=[data] if data else None, pipeline_tag=pipeline)


def method_rows(settings: dict) -> list[tuple[str, object]]:
    """(setting, value) rows of the method table: the loss and its parameters, then optimisation."""
    s, command = settings, settings.get("command", "train")
    rows: list[tuple[str, object]] = []
    if command in ("train", "sft"):
        rows += [("loss", s.get("loss"))]
        if command == "train":
            rows += _loss_rows(s)
        if s.get("sft_weight"):
            rows.append(("SFT (NLL) weight", s["sft_weight"]))
    elif command == "ppo":
        rows += [("reward", s.get("reward_model") or s.get("reward_fn")), ("KL coefficient β", s.get("kl_coef")),
                 ("adaptive KL", s.get("adaptive_kl"))]
        if s.get("adaptive_kl"):
            rows.append(("target KL (nats)", s.get("target_kl")))
        rows += [("reference πref", s.get("reference") or s.get("ref") or s.get("model")),
                 ("PPO epochs × mini-batch", f"{s.get('ppo_epochs')} × {s.get('mini_batch_size')}"),
                 ("clip range (policy, value)", f"{s.get('cliprange')}, {s.get('cliprange_value')}"),
                 ("value-loss weight", s.get("vf_coef")), ("GAE γ, λ", f"{s.get('gamma')}, {s.get('lam')}"),
                 ("max new tokens", s.get("max_new_tokens"))]
    elif command == "rm" and "reward_offset" in s:
        rows.append(("reward offset (subtracted)", s["reward_offset"]))
    rows += _optimisation_rows(s)
    return [(k, v) for k, v in rows if v is not None]


def _registered_loss(settings: dict) -> LossSpec | None:
    """The registry's entry for the run's loss (a comma list: their sum), or None for a loss this
    version does not know (a card written for an older run)."""
    try:
        return get_loss(settings.get("loss") or "dpo", settings.get("loss_weights") or "")
    except ValueError:
        return None


def _loss_rows(s: dict) -> list[tuple[str, object]]:
    """β (if the loss reads it), the reference, the loss weights, then every other setting the loss
    reads, named as the registry names them (`LOSS_SETTINGS`)."""
    spec = _registered_loss(s)
    params = spec.params if spec else tuple(LOSS_SETTINGS)
    rows = [("β", s.get("beta"))] if "beta" in params else []
    rows += [("reference πref", s.get("reference") or "none (reference-free)"),
             ("reference log-probs", s.get("reference_mode"))]
    if s.get("loss_weights"):
        rows.append(("loss weights", s["loss_weights"]))
    for name in params:
        # (ε = 0 is each loss's own default: off, or cdpo's 0.1, exo_pair's 1e-3: no row)
        if name != "beta" and not (name == "label_smoothing" and not s.get(name)):
            rows.append((LOSS_SETTINGS[name], s.get(name)))
    return rows


def _optimisation_rows(s: dict) -> list[tuple[str, object]]:
    rows = [("optimizer", s.get("optimizer")), ("learning rate", s.get("lr")),
            ("warm-up steps", s.get("warmup_steps")), ("weight decay", s.get("weight_decay") or None),
            ("batch size", s.get("batch_size")), ("micro-batch size", s.get("micro_batch_size")),
            ("steps", s.get("total_steps") or s.get("max_steps")), ("max gradient norm", s.get("max_grad_norm")),
            ("max length (tokens)", s.get("max_length")), ("precision", s.get("precision_resolved") or s.get("precision")), ("seed", s.get("seed"))]
    if s.get("lora_r"):
        rows.append(("LoRA", f"r {s['lora_r']}, α {s.get('lora_alpha')}, modules {s.get('lora_target_modules')}"
                             f"{', merged' if s.get('merge') else ' (adapters)'}"))
    return rows


def _loss_text(loss: str) -> str:
    """': ' and the registry's description of the loss; for a comma list, of each of its parts."""
    parts = [LOSSES.get(name.strip()) for name in loss.split(",")]
    if not all(spec and spec.help for spec in parts):
        return ""
    if len(parts) == 1:
        return f": {parts[0].help}"
    return ", a weighted sum of " + "; ".join(f"`{name.strip()}`: {spec.help}" for name, spec in
                                               zip(loss.split(","), parts))


def method_section(settings: dict) -> str:
    command = settings.get("command", "train")
    if command == "train":
        loss = settings.get("loss") or "dpo"
        what = f"Preference optimisation with the `{loss}` loss" + _loss_text(loss)
        what += ". The paper: Rafailov et al., *Direct Preference Optimization: Your Language Model is Secretly a " \
                "Reward Model* (2023)"
    else:
        what = _METHOD.get(command, f"`directpo {command}`")
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in method_rows(settings))
    return f"## Method\n\n{what}.\n\n| setting | value |\n| --- | --- |\n{table}\n"


def data_section(settings: dict, data_summary: str | None) -> str:
    source = settings.get("prompts") if settings.get("command") == "ppo" else settings.get("data")
    lines = [f"Training data: `{source}`" + (f" (split `{settings['data_split']}`)" if settings.get("data_split")
                                             else "") + "."]
    counts = [(k, settings.get(k)) for k in ("train_examples", "train_pairs", "prompts_count") if settings.get(k)]
    if counts:
        lines.append(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts) + ".")
    skipped = settings.get("skipped_rows")
    if skipped:
        lines.append("Rows skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ".")
    if settings.get("eval_data"):
        lines.append(f"Held-out evaluation data: `{settings['eval_data']}`.")
    text = " ".join(lines)
    if data_summary:
        text += "\n\n" + data_summary.strip()
    return f"## Data\n\n{text}\n"


def results_section(result: dict) -> str:
    """The last train and eval metrics, side by side."""
    splits = [(name, result.get(name)) for name in ("train", "eval") if isinstance(result.get(name), dict)
              and result.get(name)]
    if not splits:
        return "## Results\n\nNo metrics were recorded.\n"
    keys = [k for name, m in splits for k, v in m.items()  # not the machine's speed: it is not the model's
            if k not in ("split", "step", "epoch", "elapsed_s") and not k.endswith("_per_s") and isinstance(v, Real)
            and not isinstance(v, bool)]
    keys = list(dict.fromkeys(keys))
    head = " | ".join(f"{name} (step {m.get('step', '?')})" for name, m in splits)
    rows = "\n".join(f"| {k} | " + " | ".join(_fmt(m.get(k)) for _, m in splits) + " |" for k in keys)
    extra = [f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in result.items()
             if k not in ("train", "eval", "output_dir", "reward_offset")  # the offset is in the method table
             and isinstance(v, Real) and not isinstance(v, bool)]
    elapsed = dict(splits).get("train", {}).get("elapsed_s")
    if isinstance(elapsed, Real):
        extra.append(f"training time: {elapsed:.0f} s")
    tail = ("\n\n" + "; ".join(extra) + ".") if extra else ""
    return (f"## Results\n\nThe metrics of the last step (metrics.jsonl has every step; `directpo plot` draws "
            f"them).\n\n| metric | {head} |\n| --- |{' --- |' * len(splits)}\n{rows}{tail}\n")


def alerts_section(alerts: list[dict] | None) -> str:
    if alerts is None:
        return ""
    if not alerts:
        return "## Alarms\n\nNone: the run raised no alarm.\n"
    items = []
    for a in alerts:
        message = a.get("message") or a.get("msg") or a.get("text")
        where = f"step {a['step']}: " if a.get("step") is not None else ""
        kind = a.get("kind") or a.get("name") or a.get("level")
        rest = ", ".join(f"{k} {_fmt(v)}" for k, v in a.items()
                         if k not in ("message", "msg", "text", "step", "kind", "name", "level"))
        body = message or rest or json.dumps(a, default=str)
        items.append(f"- {where}{f'**{kind}** ' if kind else ''}{body}")
    return "## Alarms\n\nWhat the run warned about while it trained:\n\n" + "\n".join(items) + "\n"


def reproduce_section(settings: dict, command_line: list[str] | None) -> str:
    parts = ["## Reproduce\n"]
    if command_line:
        argv = list(command_line)
        if argv and Path(argv[0]).name == "directpo":
            argv = argv[1:]
        version = settings.get("directpo_version")
        parts.append(f"With directpo{f' {version}' if version else ''}:\n\n```bash\ndirectpo {shlex.join(argv)}\n```\n")
    parts.append(f"Every setting of the run (`{SETTINGS_FILE}`):\n\n<details>\n<summary>settings</summary>\n\n"
                 f"```json\n{json.dumps(settings, indent=2, default=str)}\n```\n\n</details>\n")
    return "\n".join(parts)


def usage_section(settings: dict, name: str) -> str:
    command = settings.get("command", "train")
    if command == "rm":
        code = ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"model = AutoModelForSequenceClassification.from_pretrained(\"{name}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
                "# the reward of a prompt + response: model(**tokenizer(text, return_tensors='pt')).logits[0, 0]\n"
                "# or, with directpo: directpo eval --reward-model DIR / directpo ppo --reward-model DIR")
    elif settings.get("lora_r") and not settings.get("merge"):
        code = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{name}\")  # LoRA adapters on the base model\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")")
    else:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")")
    return f"## Use\n\n```python\n{code}\n```\n"


def card_text(settings: dict, result: dict, command_line: list[str] | None, data_summary: str | None = None,
              alerts: list[dict] | None = None, name: str = "MODEL") -> str:
    """The card's Markdown body (without the metadata)."""
    model = settings.get("model")
    base = base_model_id(model)
    start = f"[`{base}`](https://huggingface.co/{base})" if base == model and base else f"`{model}`"
    if base and base != model:
        start += f" (itself from [`{base}`](https://huggingface.co/{base}))"
    verb = {"rm": "A reward model trained", "ppo": "A policy trained with PPO",
            "sft": "A model fine-tuned (SFT)"}.get(settings.get("command", "train"), "A policy trained")
    version = settings.get("directpo_version")
    intro = f"# {name}\n\n{verb} from {start} with directpo{f' {version}' if version else ''}.\n"
    sections = [intro, usage_section(settings, name), method_section(settings), data_section(settings, data_summary),
                results_section(result or {}), alerts_section(alerts), reproduce_section(settings, command_line)]
    return "\n".join(s for s in sections if s)


def write_model_card(out_dir: str | Path, settings: dict, result: dict, command_line: list[str] | None,
                     data_summary: str | None = None, alerts: list[dict] | None = None) -> Path:
    """Write out_dir/README.md (replacing one there, e.g. PEFT's stub) and return its path."""
    from huggingface_hub import ModelCard

    out = Path(out_dir)
    body = card_text(settings, result, command_line, data_summary, alerts, name=out.resolve().name)
    card = ModelCard(f"---\n{card_data(settings).to_yaml()}\n---\n\n{body}")
    path = out / CARD_FILE
    tmp = out / f".{CARD_FILE}.tmp"
    try:
        card.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def recorded_alerts(run_dir: str | Path) -> list[dict] | None:
    """The alerts the run's metrics.jsonl lines carry (`"alerts": [{"name", "step", "message"}]`,
    as `training.alarms.HealthMonitor.annotate` puts them), in order: those of a resumed run's first
    part too; [] without a metrics file. None when the file cannot be read (`runfiles.read_metrics`
    refuses it): the card then leaves the alarms out rather than say there were none, and the
    finished run does not fail for its card."""
    if not (Path(run_dir) / METRICS_FILE).exists():
        return []
    try:
        records = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    return [a for rec in records if isinstance(rec.get("alerts"), list) for a in rec["alerts"] if isinstance(a, dict)]


def invoked_command_line(argv: list[str] | None = None) -> list[str] | None:
    """The arguments of this process when it was started as `directpo ...` (or `python -m
    directpo ...`, as `--nproc` relaunches it), else None (a Python caller: no command line)."""
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and Path(argv[0]).name in ("directpo", "__main__.py") and not argv[1].startswith("-"):
        return list(argv[1:])
    return None
