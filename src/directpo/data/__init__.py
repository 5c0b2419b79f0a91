"""Preference data: formats -> canonical Example -> tokenized -> collated Batch; prompt files for sampling."""
from .collate import LAYOUTS, Batch, collate_packed, collate_padded, make_collate
from .formats import (DataError, Example, SkipReport, load_examples, message_text, pairs_to_unpaired, parse_records,
                      parse_row, read_records, split_hh, write_jsonl)
from .prompts import PromptItem, encode_prompt, load_prompts, parse_prompt_row
from .tokenize import (TokenizedExample, TokenizeStats, pair_mismatched, prompt_ids, render, render_prompt,
                       tokenize_example, tokenize_examples, truncate_prompt)

__all__ = ["LAYOUTS", "Batch", "collate_packed", "collate_padded", "make_collate", "DataError", "Example",
           "SkipReport", "load_examples", "message_text", "pairs_to_unpaired", "parse_records", "parse_row",
           "read_records", "split_hh", "write_jsonl", "PromptItem", "encode_prompt", "load_prompts",
           "parse_prompt_row", "TokenizedExample", "TokenizeStats", "pair_mismatched", "prompt_ids", "render",
           "render_prompt", "tokenize_example", "tokenize_examples", "truncate_prompt"]
