"""What both sides of the training comparison share so that they compare like with like: the
optimizer settings directpo's runs use (and TRL's are given), and the RSS baseline (libraries
imported, no model yet) above which each run's peak is also reported."""
from __future__ import annotations


def rss_now_mib() -> float | None:
    """This process's resident set now (VmRSS), in MiB; None off Linux."""
    from .procfs import MiB, read_status

    rss = read_status().get("VmRSS")
    return rss / MiB if rss is not None else None


def import_baseline(model: str) -> float | None:
    """The RSS once everything a run imports is imported, before its model is loaded: what peak RSS
    is measured above, on both sides. Both import the same libraries here first, because directpo
    imports lazily: without them its baseline would miss ~100 MiB of torch.distributed, dynamo and
    sympy (pulled in by transformers' model loading) that TRL's `import trl` already holds."""
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # the model's architecture module (the mapping imports it on access)
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model))]
    except (KeyError, OSError, ValueError):
        pass  # an unusual model: its module is then counted above the baseline, on both sides alike
    return rss_now_mib()


def rmsprop_settings(lr: float, weight_decay: float = 0.0) -> dict:
    """The hyper-parameters of directpo's `--optimizer rmsprop` (torch's RMSprop defaults, `training.optim`),
    the ones TRL's run is given and reports back."""
    import inspect

    import torch

    sig = inspect.signature(torch.optim.RMSprop).parameters
    return {"name": "rmsprop", "lr": lr, "weight_decay": weight_decay,
            **{k: sig[k].default for k in ("alpha", "eps", "momentum", "centered")}}
