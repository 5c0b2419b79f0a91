"""Preference data: formats -> canonical Example -> tokenized -> collated Batch."""
from .collate import Batch, collate_padded
from .formats import DataError, Example, SkipReport, load_examples, parse_row, read_records, split_hh
from .tokenize import TokenizedExample, TokenizeStats, render, tokenize_example, tokenize_examples

__all__ = ["Batch", "collate_padded", "DataError", "Example", "SkipReport", "load_examples", "parse_row",
           "read_records", "split_hh", "TokenizedExample", "TokenizeStats", "render", "tokenize_example",
           "tokenize_examples"]
