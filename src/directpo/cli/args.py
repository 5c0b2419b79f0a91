"""What the CLI modules share: the help formatter, flag value types checked as the flags are read
(a bad value is a one-line usage error naming the flag and the allowed range, before anything is
loaded), and the output-file guard."""
from __future__ import annotations

import argparse
import os


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, once: not when the help already says it, nor for None or on/off switches."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if "(default:" in help_ or action.default is None or isinstance(action.default, bool):
            return help_
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------
# Values checked as the flags are read: a bad one is a one-line usage error naming the flag and
# the allowed range (argparse adds "argument --flag:"), before anything is loaded.


def number(s: str, kind):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") \
            from None


def int_at_least(lo: int):
    def parse(s: str) -> int:
        v = number(s, int)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {lo}, got {s}")
        return v
    parse.__name__ = "int"
    return parse


def optional_int(s: str):
    """An integer ≥ 1, or none (no limit)."""
    if s.lower() in ("none", "null"):
        return None
    v = number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1 or none, got {s}")
    return v


def float_in(lo: float, hi: float | None = None, lo_open: bool = True):
    """A number in (lo, hi] (or [lo, hi] with lo_open=False); hi None: no upper bound."""
    def parse(s: str) -> float:
        v = number(s, float)
        ok = (v > lo if lo_open else v >= lo) and (v <= hi if hi is not None else v < float("inf"))
        if not ok:  # NaN too
            low = f"> {lo:g}" if lo_open else f"≥ {lo:g}"
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else low
            raise argparse.ArgumentTypeError(f"must be a number {want}, got {s}")
        return v
    parse.__name__ = "float"
    return parse


positive = int_at_least(1)


def overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist (never an input file); without it they are refused")


# ----------------------------------------------------------------------------------------------
# Outputs: refused when they exist (unless --overwrite) or are an input, before any model is loaded.


def same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None], overwrite: bool) -> None:
    """Each output ({flag: path}, None: not asked for) is neither an input ({flag: path}), nor
    another output, nor a directory, nor an existing file unless `overwrite`."""
    seen: list[tuple[str, str]] = []
    for flag, path in outputs.items():
        if not path:
            continue
        for other_flag, other in inputs.items():
            if other and same_file(path, other):
                raise ValueError(f"{flag} {path} is the {other_flag} input file: write the output elsewhere "
                                 "(--overwrite never replaces an input)")
        for other_flag, other in seen:
            if same_file(path, other):
                raise ValueError(f"{flag} {path} is also the {other_flag} output: give each output its own file")
        seen.append((flag, path))
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path} is a directory: give a file name")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{flag} {path} exists: pass --overwrite to replace it")




def non_negative(s: str) -> int:
    return int_at_least(0)(s)


def max_length(s: str):
    """An integer ≥ 2, or none (no limit): the range of train's --max-length."""
    if s.lower() in ("none", "null"):
        return None
    v = number(s, int)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 2 or none, got {s}")
    return v
