"""`directpo merge ADAPTER_DIR --out DIR [--dtype bf16|fp32|auto] [--dequantize]`: a LoRA adapter
merged into its base, written as a Hugging Face model folder (`training.merge`)."""
from __future__ import annotations

import json

from ..config import add_flags, build_config
from ..training.merge import MergeConfig


def register(command: str, parser) -> None:
    add_flags(parser, MergeConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..api import merge

    print(json.dumps(merge(build_config(args, MergeConfig)), indent=1))
    return 0
