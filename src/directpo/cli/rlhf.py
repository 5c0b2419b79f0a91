"""`directpo rm` (flags from `RewardModelConfig`) and `directpo ppo` (flags from `PPOConfig`)."""
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
    from ..rlhf.config import RewardModelConfig
    from ..rlhf.reward_model import train_reward_model

    summary = train_reward_model(build_config(args, RewardModelConfig))
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval", "reward_offset")}))
    return 0


def run_ppo(args) -> int:
    from ..rlhf.config import PPOConfig
    from ..rlhf.ppo import ppo

    print(json.dumps(ppo(build_config(args, PPOConfig))))
    return 0
