"""Preference data: formats -> canonical Example -> tokenized -> collated Batch."""
from .collate import LAYOUTS, Batch, collate_packed, collate_padded, make_collate
from .formats import DataError, Example, SkipReport, load_examples, parse_row, read_records, split_hh
from .tokenize import TokenizedExample, TokenizeStats, render, tokenize_example, tokenize_examples

__all__ = ["LAYOUTS", "Batch", "collate_packed", "collate_padded", "make_collate", "DataError", "Example", "SkipReport", "load_examples", "parse_row",
           "read_records", "split_hh", "TokenizedExample", "TokenizeStats", "render", "tokenize_example",
           "tokenize_examples"]
