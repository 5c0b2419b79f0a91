"""`directpo rm` (flags from `RewardModelConfig`) and `directpo ppo` (flags from `PPOConfig`): the flags,
then the Python API's job (`directpo.api`)."""
from __future__ import annotations

import json

from ..config import add_flags, build_config


def register(command: str, parser) -> None:
    if command == "rm":
        from ..rlhf.config import RewardModelConfig

        add_flags(parser, RewardModelConfig)
        parser.set_defaults(func=run_rm)
    else:
        from ..rlhf.config import PPOConfig

        add_flags(parser, PPOConfig)
        parser.set_defaults(func=run_ppo)


def run_rm(args) -> int:
    from ..api import train_reward_model
    from ..rlhf.config import RewardModelConfig

    summary = train_reward_model(build_config(args, RewardModelConfig)).summary
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval", "reward_offset")}))
    return 0


def run_ppo(args) -> int:
    from ..api import ppo
    from ..rlhf.config import PPOConfig

    print(json.dumps(ppo(build_config(args, PPOConfig)).summary))
    return 0
