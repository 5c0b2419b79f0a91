"""`directpo inspect`: know your data before training on it.

`inspect_data` reads a preference file exactly as `train` does (same loaders, template and
truncation) and measures it: row shapes and invalid rows, duplicates and contradictions, length
bias, truncation, tokenization problems, and with a model the reference's log-probs of every pair.
`write_report` puts the result in a directory (report.md, report.json, pairs.jsonl, figures); the
cheap checks that need only tokenized examples live below, in `directpo.data.checks`, for `train`.
"""
__all__ = ["REPORT_FILES", "console_summary", "inspect_data", "render_example", "row_shape", "write_report"]
_HOME = {"inspect_data": "dataset", "render_example": "dataset", "row_shape": "dataset", "REPORT_FILES": "report",
         "console_summary": "report", "write_report": "report"}


def __getattr__(name: str):
    """Loaded on first use, so reading `InspectConfig` (for `directpo inspect --help`) loads no torch."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
