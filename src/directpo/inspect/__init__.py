"""`directpo inspect`: know your data before training on it.

`inspect_data` reads a preference file exactly as `train` does (same loaders, template and
truncation) and measures it: row shapes and invalid rows, duplicates and contradictions, length
bias, truncation, tokenization problems, and with a model the reference's log-probs of every pair.
`write_report` puts the result in a directory (report.md, report.json, pairs.jsonl, figures); the
cheap checks that need only tokenized examples live below, in `directpo.data.checks`, for `train`.
"""
from .dataset import inspect_data, render_example, row_shape
from .report import REPORT_FILES, console_summary, write_report

__all__ = ["REPORT_FILES", "console_summary", "inspect_data", "render_example", "row_shape", "write_report"]
