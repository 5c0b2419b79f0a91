"""The docs a newcomer reads (issue #28): README.md and docs/*.md link only to files (and headings)
that exist, every `directpo <command>` line in them uses only flags that command accepts (and, where
a flag has a fixed set of values, only those values), the README stays short, and every docs page
is linked from README.md or docs/ARCHITECTURE.md.

Command lines are taken from fenced shell/text blocks (backslash continuations joined, comments
dropped) and from inline code spans; every `--flag` after `directpo <command>` must be an option of
`directpo.cli.make_parser(command)`'s subparser for that command."""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
COMMAND = re.compile(r"(?<![\w./-])directpo\s+([^\s`]+)(.*)$", re.S)
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
LITERAL = re.compile(r"^[a-z0-9_.,|-]+$")
NAME = re.compile(r"^[a-z][a-z-]*(\|[a-z][a-z-]*)*$")  # a command word (`dialogue|summarize`: either)


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------------------------------------
# Markdown: code blocks, links, headings


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(3).lower(), m.group(4)) for m in FENCE.finditer(text)]


def without_code(text: str) -> str:
    """`text` with fenced blocks and inline code spans removed (what is left is prose and links)."""
    text = FENCE.sub("", text)
    return INLINE_CODE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: links reduced to their text, lower case, punctuation
    dropped (letters of any script, digits, `_` and `-` kept), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (duplicates numbered as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(path: Path) -> list[str]:
    """Relative links of `path` whose file, or heading anchor, does not exist."""
    problems = []
    for m in LINK.finditer(without_code(path.read_text(encoding="utf-8"))):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: link ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor.lower() not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def linked_files(path: Path) -> set[Path]:
    """The existing files `path` links to."""
    out = set()
    for m in LINK.finditer(without_code(path.read_text(encoding="utf-8"))):
        file_part = m.group(2).partition("#")[0]
        if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.I):
            out.add((path.parent / file_part).resolve())
    return out


# ------------------------------------------------------------------------------------------------
# Command lines


def command_lines(text: str) -> list[str]:
    """Every stretch of `text` that may hold a `directpo <command> ...` line: the logical lines of
    fenced shell/text blocks and every inline code span outside them."""
    out = []
    for lang, body in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # a comment, whole-line or trailing
            if line.strip():
                out.append(line)
    for m in INLINE_CODE.finditer(FENCE.sub("", text)):
        out.append(m.group(2).replace("\n", " "))
    return out


@functools.lru_cache(maxsize=None)
def command_parser(command: str) -> argparse.ArgumentParser | None:
    """The subparser of `directpo <command>` (None: no such command)."""
    from directpo.cli import COMMANDS, make_parser

    if command not in COMMANDS:
        return None
    parser = make_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def nested_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A command's own subcommands (`directpo experiment sentiment|dialogue|summarize`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def value_problems(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """Values written after a flag that takes a fixed set of values (or `--loss`) that are not one
    of them; placeholders (`N`, `MODEL`, `DIR`, ...) are not values."""
    from directpo.losses import LOSSES

    problems = []
    for i, token in enumerate(tokens[:-1]):
        action = parser._option_string_actions.get(token)
        value = tokens[i + 1]
        if action is None or action.nargs == 0 or value.startswith("-") or not LITERAL.match(value):
            continue
        if action.choices is not None:
            bad = [v for v in value.split("|") if v not in action.choices]
            if bad:
                problems.append(f"{token} {value}: {', '.join(bad)} not one of {sorted(action.choices)}")
        elif token == "--loss":
            bad = [v for v in re.split(r"[|,]", value) if v and v not in LOSSES]
            if bad:
                problems.append(f"--loss {value}: no loss named {', '.join(bad)}")
    return problems


def cli_problems(line: str) -> list[str]:
    """What is wrong with the `directpo <command> ...` in `line` (nothing: no such line)."""
    m = COMMAND.search(line)
    if m is None:
        return []
    command, rest = m.group(1), m.group(2)
    if not NAME.match(command):  # a placeholder: `directpo <command> --help`, `directpo COMMAND`
        return []
    flags = FLAG.findall(rest)
    parser = command_parser(command)
    if parser is None:
        return [f"`directpo {command}`: no such command"] if flags else []
    parsers = [parser]
    nested = nested_parsers(parser)
    words = rest.split()
    if nested and words and not words[0].startswith("-"):
        if not NAME.match(words[0]):  # `directpo experiment ... --flag`: some subcommand must take it
            return [f"`directpo {command} {words[0]}`: no subcommand has {f}" for f in flags
                    if not any(f in p._option_string_actions for p in nested.values())]
        names = words[0].split("|")
        missing = [n for n in names if n not in nested]
        if missing:
            return [f"`directpo {command} {words[0]}`: no subcommand {', '.join(missing)}"]
        parsers = [nested[n] for n in names]
        command = f"{command} {words[0]}"
    tokens = re.sub(r"[\[\]()]", " ", rest).split()
    problems = []
    for p in parsers:
        problems += [f"`directpo {command}` has no flag {f}" for f in flags if f not in p._option_string_actions]
        problems += [f"`directpo {command}`: {v}" for v in value_problems(p, tokens)]
    return sorted(set(problems))


def page_cli_problems(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}: {problem}   [in: {line.strip()[:120]}]"
            for line in command_lines(path.read_text(encoding="utf-8")) for problem in cli_problems(line)]


# ------------------------------------------------------------------------------------------------
# The checks


@pytest.mark.parametrize("path", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_and_headings_that_exist(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_use_only_flags_the_cli_accepts(path):
    problems = page_cli_problems(path)
    assert not problems, "\n".join(problems)


def test_the_readme_has_command_lines_to_check():
    """The check above is not vacuous: the README's quick start and first run are found."""
    found = [line for line in command_lines(README.read_text(encoding="utf-8")) if COMMAND.search(line)]
    assert any("directpo train" in line and "--output-dir" in line for line in found), found


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme_or_the_architecture_page():
    linked = linked_files(README) | linked_files(DOCS / "ARCHITECTURE.md")
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages linked from neither README.md nor docs/ARCHITECTURE.md: {orphans}"


# ------------------------------------------------------------------------------------------------
# The checker itself catches what it is for


def test_a_bogus_flag_a_bogus_value_and_a_bogus_command_are_caught():
    assert cli_problems("directpo train --model M --data d.jsonl --output-dir o --bogus-flag 3") == [
        "`directpo train` has no flag --bogus-flag"]
    assert cli_problems("directpo train --model M --optimizer rmsprop|adam") != []
    assert cli_problems("directpo train --loss dpo,nonsense") != []
    assert cli_problems("directpo trian --model M") != []
    assert cli_problems("directpo experiment dialogue --preset smoke --corpus x") != []  # a sentiment flag
    assert cli_problems("directpo experiment sentiment --preset smoke --corpus x") == []
    assert cli_problems("torchrun --nnodes 2 --rdzv-id x -m directpo train --fsdp") == []  # torchrun's own flags
    assert cli_problems("directpo <command> --help") == [] and cli_problems("directpo experiment ...") == []


def test_a_bogus_flag_in_a_fenced_block_or_inline_code_is_found(tmp_path):
    text = ("Run\n\n```bash\ndirectpo score --model m \\\n    --data d --out s.jsonl --no-such-flag  # a comment\n```\n\n"
            "and `directpo eval --judge-order sideways`.\n\n```python\nimport directpo  # not a command line\n```\n")
    lines = command_lines(text)
    problems = [p for line in lines for p in cli_problems(line)]
    assert any("--no-such-flag" in p for p in problems) and any("sideways" in p for p in problems), problems


def test_a_broken_link_or_anchor_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Some heading: here\n\n## `code` title\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#some-heading-here) [ok](b.md#code-title) [x](missing.md) [y](b.md#nowhere) "
                    "[web](https://example.com/x) `[not a link](nothing.md)`\n")
    problems = link_problems(page)
    assert len(problems) == 2 and "missing.md" in problems[0] and "#nowhere" in problems[1], problems
