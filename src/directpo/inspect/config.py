"""Settings of `directpo inspect`: a dataclass whose fields are its flags and YAML keys (see
`directpo.config`); the lengths and the invalid-row policy mean what `train`'s do."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_settings, setting
from ..precision import PRECISIONS


@dataclass
class InspectConfig:
    """The data, the reference, the report"""

    data: str = setting(None, "preference data: .jsonl/.json/.parquet file, or a `datasets` name/dir (the formats "
                              "train reads)", required=True, input=True)
    model: str | None = setting(None, "the reference model: its tokenizer, and its log-probs of every pair (how often "
                                      "it already prefers the chosen response)", input=True)
    tokenizer: str | None = setting(None, "tokenize with this model's tokenizer instead (default: --model's); with "
                                          "it and no --model, no log-probs are computed", input=True)
    max_length: int | None = setting(512, "max tokens of prompt + response, as train's (none: no limit)", ge=2)
    max_prompt_length: int | None = setting(None, "max prompt tokens, as train's (default: none; prompts of pairs "
                                                  "that do not fit are cut)", ge=1)
    on_invalid: str = setting("error", "bad rows, as train's: 'error' reports where train would stop, 'skip' what it "
                                       "would leave out; invalid rows are counted by kind either way",
                              choices=["error", "skip"])
    data_split: str | None = setting(None, "split name for `datasets` sources (default: train)")
    out: str | None = setting(None, "write report.md, report.json, pairs.jsonl and PNG figures in this directory")
    overwrite: bool = setting(False, "replace a report that exists in --out", switch="--overwrite")
    batch_size: int = setting(8, "pairs scored at once with --model", ge=1)
    device: str | None = setting(None, "cpu or cuda for --model (default: cuda when available)")
    threads: int = setting(0, "CPU threads for the reference's log-probs (default 0: one for a tiny model, hidden "
                              "size ≤ 256, else torch's default)", ge=0)
    precision: str = setting("fp32", "reference log-prob precision (auto: bf16 where this machine runs it faster)",
                             choices=list(PRECISIONS))
    json: bool = setting(False, "print report.json's content instead of the summary", switch="--json")
    progress: bool = setting(True, "show a progress bar", switch="--no-progress", switch_help="no progress bar")

    def validate(self) -> "InspectConfig":
        check_settings(self)
        if not self.model and not self.tokenizer:
            raise ConfigError("give --model (the reference: its tokenizer and log-probs) or --tokenizer (tokens only)")
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            raise ConfigError("--max-prompt-length must be smaller than --max-length")
        return self
