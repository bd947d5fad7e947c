"""``ferry serve``'s options against what users read: ``--help`` gives every default, and every flag of the README's
configuration table exists with the default the table gives (and every option is in the table)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ferry.server.__main__ import _parser

README = Path(__file__).resolve().parents[2] / "README.md"
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _serve() -> argparse.ArgumentParser:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


def _options() -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in _serve()._actions if a.option_strings and a.dest != "help"}


def readme_table() -> dict[str, str]:
    """Flag -> the default column of the README's "Configuration reference" table."""
    section = README.read_text().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`--"):
            continue
        flags = re.findall(r"`(--[\w-]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")] if len(flags) > 1 else [cells[1]]
        assert len(defaults) == len(flags), row
        table.update(zip(flags, defaults, strict=True))
    return table


def _value(text: str) -> object:
    """A table default as a value: ``off``, a number, ``64 MiB``, or a (backquoted) word."""
    text = text.strip("`")
    if text == "off":
        return None
    if match := re.fullmatch(r"(\d+) (KiB|MiB|GiB)", text):
        return int(match[1]) * UNITS[match[2]]
    try:
        return float(text)
    except ValueError:
        return text


def test_the_readme_table_names_every_option_but_the_repository() -> None:
    assert set(readme_table()) == set(_options()) - {"--model-repository"}


@pytest.mark.parametrize("flag", sorted(readme_table()))
def test_each_readme_flag_exists_with_the_default_the_table_gives(flag: str) -> None:
    action = _options().get(flag)
    assert action is not None, f"the README's configuration table names {flag}, which ferry serve does not have"
    default = None if action.default is False else action.default
    if isinstance(default, int | float) and not isinstance(default, bool):
        default = float(default)
    assert _value(readme_table()[flag]) == default, flag


def test_help_shows_every_default_once() -> None:
    serve = _serve()
    formatter = serve._get_formatter()
    for flag, action in _options().items():
        entry = formatter._expand_help(action)  # one option's help text, as --help prints it
        if action.required:
            assert "(default:" not in entry, flag
            continue
        shown = "off" if action.default is None or action.default is False else str(action.default)
        assert entry.count("(default:") == 1 and entry.endswith(f"(default: {shown})"), (flag, entry)
    assert " ".join(serve.format_help().split()).count("(default: ") == len(_options()) - 1  # unwrapped
