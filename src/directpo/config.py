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
import math
from dataclasses import MISSING, field, fields
from typing import Any


class ConfigError(ValueError):
    """A setting that is unknown, missing or of the wrong type (one line, names the key)."""


def setting(default, help: str, **meta):
    """A config field: its default, its help text, and optional `choices`, `required`, `nargs`/`const`,
    bounds `ge`, `gt`, `le`, `lt` (checked by `check_ranges`: every numeric setting in one place), and
    `input=True` for a path the command reads (`input_paths`: never written over)."""
    return field(default=default, metadata={"help": help, **meta})


def input_paths(cfg) -> dict[str, str | None]:
    """{flag: value} of the settings declared `input=True`: what the command reads (a model, a
    reference, data), which its outputs must never overwrite."""
    return {flag_name(f.name): getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("input")}


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


def config_fields(cls):
    """(name, type, default, metadata) of a config dataclass, for building CLI flags."""
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        yield f.name, f.type, default, f.metadata


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Conversion of a raw value (YAML scalar or command-line string) to a field's declared type


def _base_type(type_name) -> tuple[str, bool]:
    """('int'|'float'|'bool'|'str', optional?) from an annotation such as 'int | None'."""
    t = str(type_name)
    optional = "None" in t
    for kind in ("bool", "int", "float"):
        if kind in t:
            return kind, optional
    return "str", optional


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def convert(value: Any, type_name, key: str) -> Any:
    """`value` as the field's type, or a ConfigError naming `key` and what was expected."""
    kind, optional = _base_type(type_name)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got {value!r})")
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
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
        values[name] = convert(value, known[name].type, f"{path}: {key}")
        _check_choice(values[name], known[name].metadata, f"{path}: {key}")
    return values


def _flag_parser(type_name, flag: str):
    def parse(s: str):
        try:
            return convert(s, type_name, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    parse.__name__ = _base_type(type_name)[0]
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


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (and `--config FILE`), grouped by topic in --help. Defaults are
    SUPPRESSed, so the parsed namespace holds exactly what the user typed."""
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of settings (keys as the flags, dashes or underscores)")
    for title, group_fields in _groups(cls):
        group = parser.add_argument_group(title)
        for f in group_fields:
            if f.name not in skip:
                _add_flag(group, f)


def _add_flag(group, f) -> None:
    meta, flag = f.metadata, flag_name(f.name)
    default = None if f.default is MISSING else f.default
    bounds = allowed_range(meta)
    text = meta.get("help", "")
    shown = meta.get("required") or "(default:" in text  # the help says its default itself
    help_ = text + (f"; {bounds}" if bounds else "") + ("" if shown else f" (default: {default})")
    if _base_type(f.type)[0] == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_, default=argparse.SUPPRESS)
        return
    extra = {"nargs": meta["nargs"], "const": meta.get("const")} if "nargs" in meta else {}
    group.add_argument(flag, type=_flag_parser(f.type, flag), help=help_, choices=meta.get("choices"),
                       default=argparse.SUPPRESS, metavar=None if meta.get("choices") else f.name.upper(), **extra)


def build_config(args: argparse.Namespace, cls, **defaults):
    """Config = dataclass defaults < command defaults < YAML file < command-line flags."""
    values: dict = dict(defaults)
    if getattr(args, "config", None):
        values.update(load_yaml(args.config, cls))
    names = {f.name for f in fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)
