"""Settings: one dataclass per command, each field a command-line flag with its help text.

A field declared with `setting(default, help, ...)` becomes the flag `--field-name` of the command
that takes the dataclass, and a key of its YAML `--config FILE` (dashes or underscores). Values are
converted to the field's declared type wherever they come from, so `lr: 1e-4` in YAML (which YAML
itself reads as a string) is the float 1e-4, and a value that does not convert is a one-line error
naming the key. Precedence: dataclass defaults < command defaults < YAML file < command-line flags.

This module is the bottom of the configuration story: trainers declare their dataclasses with
`setting`; the CLI builds parsers with `add_flags` and configs with `build_config`.
"""
from __future__ import annotations

import argparse
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A setting that is unknown, missing or of the wrong type (one line, names the key)."""


def setting(default, help: str, **meta):
    """A config field: its default, its help text, and optional `choices`, `required`, `nargs`/`const`,
    bounds `ge`, `gt`, `le`, `lt` (checked by `check_ranges`: every numeric setting in one place), and
    `input=True` for a path the command reads (`input_paths`: never written over), `resumable=True`
    for a setting a resumed run may change (`ResumableSettings`). On the command line:
    `metavar`, `positional=True` (an argument, not a flag), `exclusive=NAME` (at most one of the fields
    sharing NAME: `check_exclusive`), `switch=FLAG` for a bool shown as that one flag (`--overwrite`, or
    `--no-progress` with `switch_help`; the other form is accepted too), and `parse=f` for a value
    with its own syntax (f(raw) -> value, a ValueError saying what was expected)."""
    return field(default=default, metadata={"help": help, **meta})


class ResumableSettings:
    """`Config.RESUMABLE_CHANGES`: the names of the settings declared `resumable=True`, those a run
    may change when it resumes from a checkpoint (they do not change its trajectory: --max-steps,
    --save-every, --threads, ...). Declared on each field, so a new setting says it where it is."""

    def __get__(self, obj, cls) -> frozenset:
        return frozenset(f.name for f in fields(cls) if f.metadata.get("resumable"))


def input_paths(cfg) -> dict[str, str | None]:
    """{flag: value} of the settings declared `input=True`: what the command reads (a model, a
    reference, data), which its outputs must never overwrite."""
    return {flag_name(f.name): getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("input")}


def check_settings(cfg) -> None:
    """What every settings dataclass checks of itself: required settings given, numbers within their
    ranges, at most one of each exclusive set."""
    check_required(cfg)
    check_ranges(cfg)
    check_exclusive(cfg)


def check_exclusive(cfg) -> None:
    """At most one field of each `exclusive` set given (set, not off), else one ConfigError naming them
    (on the command line argparse refuses it first; this catches a YAML file and a flag)."""
    given: dict[str, list[str]] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("exclusive") and value is not None and value is not False:
            given.setdefault(f.metadata["exclusive"], []).append(flag_name(f.name))
    for flags in given.values():
        if len(flags) > 1:
            raise ConfigError(f"{' and '.join(flags)} exclude each other: give one")


def check_required(cfg) -> None:
    """Every field declared `required=True` is set, else one ConfigError naming the flags."""
    missing = [f.name for f in fields(cfg) if f.metadata.get("required") and getattr(cfg, f.name) is None]
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join(flag_name(m) for m in missing))


_BOUNDS = {"ge": ("≥", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("≤", lambda v, b: v <= b),
           "lt": ("<", lambda v, b: v < b)}


def allowed_range(meta: dict) -> str:
    """'≥ 1', '> 0', '≥ 0 and < 0.5', ... from a field's bounds ('' when unbounded)."""
    return " and ".join(f"{sym} {meta[k]:g}" for k, (sym, _) in _BOUNDS.items() if k in meta)


def check_ranges(cfg) -> None:
    """Every bounded numeric setting within its range, else a ConfigError naming the flag, the
    allowed range, what the setting means and the value given."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        what = meta.get("help", "").split(";")[0].split(" (")[0]
        if not math.isfinite(value):  # NaN fails every bound; no setting means anything at infinity
            bounds = allowed_range(meta)
            raise ConfigError(f"{flag_name(f.name)} must be a finite number{' ' + bounds if bounds else ''} ({what}); "
                              f"got {value:g}")
        if any(k in meta and not ok(value, meta[k]) for k, (_, ok) in _BOUNDS.items()):
            raise ConfigError(f"{flag_name(f.name)} must be {allowed_range(meta)} ({what}); got {value:g}")


def check_micro_batch(batch_size: int, micro_batch_size: int) -> None:
    """--batch-size a multiple of --micro-batch-size, else a ConfigError naming both flags and the
    largest micro-batch size that fits (the micro-batch size is often the default, never given)."""
    if batch_size % micro_batch_size:
        fit = max(d for d in range(1, min(batch_size, micro_batch_size) + 1) if batch_size % d == 0)
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of --micro-batch-size {micro_batch_size} "
                          f"(examples per forward/backward); pass --micro-batch-size {fit}, or another divisor of "
                          f"{batch_size}")


def config_fields(cls):
    """(name, type, default, metadata) of a config dataclass, for building CLI flags."""
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        yield f.name, f.type, default, f.metadata


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Conversion of a raw value (YAML scalar or command-line string) to a field's declared type


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """{field: its declared type} of a settings dataclass (annotations are text under `from __future__
    import annotations`: `typing.get_type_hints` evaluates them)."""
    return typing.get_type_hints(cls)


def _split_optional(annotation) -> tuple[Any, bool]:
    """(the type, optional?) of an annotation such as `int | None`, given as a type or as its text."""
    if isinstance(annotation, str):
        annotation = typing.get_type_hints(types.SimpleNamespace(__annotations__={"v": annotation}))["v"]
    args = typing.get_args(annotation) \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return next((a for a in args if a is not type(None)), str), type(None) in args


def _base_type(annotation) -> tuple[str, bool]:
    """('int'|'float'|'bool'|'str'|'list', optional?) of an annotation such as `int | None`."""
    base, optional = _split_optional(annotation)
    if typing.get_origin(base) is list:
        return "list", optional
    return {bool: "bool", int: "int", float: "float"}.get(base, "str"), optional


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def convert(value: Any, type_name, key: str, parse=None) -> Any:
    """`value` as the field's type (or as its `parse` hook reads it), or a ConfigError naming `key` and
    what was expected."""
    kind, optional = _base_type(type_name)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got {value!r})")
    if parse is not None:
        try:
            return parse(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    if kind == "list":  # a YAML list, or one value
        item = (typing.get_args(_split_optional(type_name)[0]) or (str,))[0]
        return [convert(v, item, key) for v in (value if isinstance(value, (list, tuple)) else [value])]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, int):
                return value
            s = str(value).strip()
            try:
                return int(s)
            except ValueError:
                f = float(s)  # "1e3" -> 1000
                if not f.is_integer():
                    raise
                return int(f)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
        raise ConfigError(f"{key}: expected {want}{' or none' if optional else ''}, got {value!r}") from None


def _check_choice(value, meta: dict, key: str) -> None:
    choices = meta.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------------------------
# YAML files and argparse


def load_yaml(path: str, cls) -> dict:
    """The settings of a YAML file, converted to `cls`'s field types; unknown keys are errors."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value")
    known, types_ = {f.name: f for f in fields(cls)}, field_types(cls)
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
        values[name] = convert(value, types_[name], f"{path}: {key}", known[name].metadata.get("parse"))
        _check_choice(values[name], known[name].metadata, f"{path}: {key}")
    return values


def _in_range(value, meta: dict) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    bounded = any(k in meta for k in _BOUNDS)
    return not bounded or (math.isfinite(value) and all(ok(value, meta[k]) for k, (_, ok) in _BOUNDS.items()
                                                        if k in meta))


def _wanted(kind: str, optional: bool, meta: dict) -> str:
    """'an integer ≥ 1', 'a number in (0, 1]', 'an integer ≥ 2 or none', ...: what a bounded flag takes."""
    lo = next((k for k in ("ge", "gt") if k in meta), None)
    hi = next((k for k in ("le", "lt") if k in meta), None)
    if lo and hi:
        bounds = f"in {'[' if lo == 'ge' else '('}{meta[lo]:g}, {meta[hi]:g}{']' if hi == 'le' else ')'}"
    else:
        bounds = allowed_range(meta)
    return f"{'an integer' if kind == 'int' else 'a number'} {bounds}{' or none' if optional else ''}"


def _flag_parser(type_name, flag: str, meta: dict | None = None, check_range: bool = False):
    """The argparse `type` of a flag: the value converted (a list's items one by one, as `nargs` gives
    them), and with `check_range` its bounds checked as it is read."""
    meta = meta or {}
    if _base_type(type_name)[0] == "list" and "parse" not in meta:
        type_name = (typing.get_args(_split_optional(type_name)[0]) or (str,))[0]
    kind, optional = _base_type(type_name)

    def parse(s: str):
        try:
            value = convert(s, type_name, flag, meta.get("parse"))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
        if check_range and not _in_range(value, meta):
            raise argparse.ArgumentTypeError(f"must be {_wanted(kind, optional, meta)}, got {s}")
        return value
    parse.__name__ = kind
    return parse


def _groups(cls) -> list[tuple[str, list]]:
    """The fields of `cls` grouped by the dataclass that declares them (most specific first), each
    group titled by its class's docstring; required fields in a group of their own, first."""
    by_name = {f.name: f for f in fields(cls)}
    required = [f for f in by_name.values() if f.metadata.get("required")]
    groups = [("required", required)] if required else []
    for klass in cls.__mro__:
        own = [by_name[n] for n in klass.__dict__.get("__annotations__", {}) if n in by_name]
        own = [f for f in own if not f.metadata.get("required")]
        if own:
            title = (klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip(".")
            groups.append((title, own))
            for f in own:
                by_name.pop(f.name)
    return groups


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), check_ranges_early: bool = False
              ) -> None:
    """One flag per field of `cls` (and `--config FILE`), grouped by topic in --help. Defaults are
    SUPPRESSed, so the parsed namespace holds exactly what the user typed. `check_ranges_early`: a
    flag out of its range is a usage error as it is read ("argument --n: must be an integer ≥ 1, got
    0"), not only when the settings are checked (`check_ranges`, which also covers the YAML file)."""
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of settings (keys as the flags, dashes or underscores)")
    types_, exclusive = field_types(cls), {}
    for title, group_fields in _groups(cls):
        group = parser.add_argument_group(title)
        for f in group_fields:
            if f.name in skip:
                continue
            name = f.metadata.get("exclusive")
            if name and name not in exclusive:
                exclusive[name] = group.add_mutually_exclusive_group()
            _add_flag(exclusive[name] if name else group, f, types_[f.name], check_ranges_early)


def _plain(text: str) -> str:
    """Help text as argparse prints it: a setting's help is prose, so a `%` ("95 %") is a percent sign,
    not a format directive that would make `--help` fail."""
    return text.replace("%", "%%")


def _help(meta: dict, default) -> str:
    """The help text, the allowed range, and the default unless the text says it (or it is None)."""
    bounds, text = allowed_range(meta), meta.get("help", "")
    shown = meta.get("required") or "(default:" in text or default is None
    return _plain(text + (f"; {bounds}" if bounds else "") + ("" if shown else f" (default: {default})"))


def _add_flag(group, f, annotation, check_range: bool = False) -> None:
    meta, flag = f.metadata, flag_name(f.name)
    default = None if f.default is MISSING else f.default
    kind = _base_type(annotation)[0]
    if kind == "bool":
        _add_bool(group, f.name, meta, default)
        return
    extra = {"nargs": meta["nargs"], "const": meta.get("const")} if "nargs" in meta else {}
    metavar = meta.get("metavar") or (None if meta.get("choices") else f.name.upper())
    names = [f.name] if meta.get("positional") else [flag]
    group.add_argument(*names, type=_flag_parser(annotation, flag, meta, check_range), help=_help(meta, default),
                       choices=meta.get("choices"), default=argparse.SUPPRESS, metavar=metavar, **extra)


def _add_bool(group, name: str, meta: dict, default) -> None:
    """--flag/--no-flag; or, with `switch`, the one form the help shows (the other one accepted too)."""
    flag, text = flag_name(name), meta.get("help", "")
    shown = meta.get("switch")
    if shown is None:
        help_ = text + ("" if "(default:" in text else f" (default: {default})")
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=_plain(help_), default=argparse.SUPPRESS)
        return
    negative = "--no-" + flag[2:]
    if shown not in (flag, negative):
        raise ValueError(f"switch {shown!r} of setting {name!r}: expected {flag} or {negative}")
    on_off = ("store_false", "store_true") if shown == negative else ("store_true", "store_false")
    group.add_argument(shown, dest=name, action=on_off[0], help=_plain(meta.get("switch_help", text)),
                       default=argparse.SUPPRESS)
    group.add_argument(negative if shown == flag else flag, dest=name, action=on_off[1], help=argparse.SUPPRESS,
                       default=argparse.SUPPRESS)


def build_config(args: argparse.Namespace, cls, **defaults):
    """Config = dataclass defaults < command defaults < YAML file < command-line flags."""
    values: dict = dict(defaults)
    if getattr(args, "config", None):
        values.update(load_yaml(args.config, cls))
    names = {f.name for f in fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# Recorded settings against the present ones (resume, a finished pipeline stage, an online run)


def changed_settings(recorded: dict, cfg, ignore=frozenset(), flags: bool = False) -> list[str]:
    """'name: recorded -> now' ('--flag recorded -> now' with `flags`) for every setting of `cfg` that differs from the `recorded` ones
    (directpo_config.json, a checkpoint's state), except those in `ignore` and those the run does
    not read (`cfg.unread_settings()`, where the config has it: a loss setting the chosen loss
    ignores). A setting newer than the record counts as its default then (the run that wrote the
    record behaved so); two paths are the same when both name the same existing file."""
    import json
    import os
    from dataclasses import asdict

    skip = set(ignore) | set(getattr(cfg, "unread_settings", lambda: ())())
    defaults = {f.name: f.default for f in fields(cfg)}
    out = []
    for name, now in asdict(cfg).items():
        then = recorded.get(name, defaults[name])
        if name in skip or then == json.loads(json.dumps(now)):
            continue
        if isinstance(then, str) and isinstance(now, str) and os.path.exists(then) and os.path.exists(now) \
                and os.path.realpath(then) == os.path.realpath(now):
            continue
        out.append(f"{flag_name(name)} {then!r} -> {now!r}" if flags else f"{name}: {then!r} -> {now!r}")
    return out


# ---- Settings shared by commands on different layers (training, rlhf, eval): defined once here ----

@dataclass
class FixedLengthSettings:
    """Fixed-length completions"""

    # One definition for every command that samples, scores or trains on completions (#31 item 4)
    fixed_length: bool = setting(False, "fixed-length completions: EOS is never sampled (where the command samples, "
                                        "every completion runs to --max-new-tokens), every log-prob (training, the "
                                        "reference, scores, the KL estimate, PPO's ratios) is the model's renormalised "
                                        "without EOS, and rows read from data get no EOS appended (a response holding "
                                        "one is refused)")
