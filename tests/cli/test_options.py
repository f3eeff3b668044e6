"""Each command's ``--help`` shows its options' defaults, the defaults the Python API's dataclasses hold are the
command's, and the docs list every option that has a default with that default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import rge
from rge.cli import main, option_defaults
from rge.serving import ServerSettings
from rge.training import TrainingConfig

DOCS = Path(rge.__file__).resolve().parents[1] / "docs"
PAGES = {"demo": "usage.md", "encode": "scale.md", "eval mmeb": "evaluation.md", "serve": "serving.md",
         "train": "training.md"}  # fmt: skip
"""Where each command's options are listed."""


def test_every_command_has_a_page():
    assert set(option_defaults()) == set(PAGES)


@pytest.mark.parametrize("command", sorted(PAGES))
def test_help_shows_each_default(capsys, command):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    defaults = {option: value for option, value in option_defaults()[command].items() if value is not None}
    assert defaults
    assert [option for option, value in defaults.items() if f"(default: {value})" not in shown] == []


def test_flags_and_options_without_a_value_show_no_default():
    encode = option_defaults()["encode"]
    assert encode["--side"] == "document" and encode["--shard-size"] == 10000
    assert encode["--ray"] is None and encode["--ignore-fields"] is None and encode["--dtype"] is None


@pytest.mark.parametrize(("command", "settings"), [("train", TrainingConfig), ("serve", ServerSettings)])
def test_defaults_are_the_dataclass_fields(monkeypatch, command, settings):
    """An option named after a field has the field's default, and follows it when it changes (flags, and fields
    without a default, which the command requires or defaults itself, aside)."""
    none = (dataclasses.MISSING, dataclasses.MISSING)
    fields = {field.name: field for field in dataclasses.fields(settings)
              if (field.default, field.default_factory) != none and not isinstance(field.default, bool)}  # fmt: skip
    options = {option: fields[option[2:].replace("-", "_")] for option in option_defaults()[command]
               if option[2:].replace("-", "_") in fields}  # fmt: skip
    assert len(options) >= 10
    for option, field in options.items():
        expected = None if field.default is dataclasses.MISSING else field.default
        assert option_defaults()[command][option] == expected, option
    moved = {option: field for option, field in options.items() if isinstance(field.default, int)}
    for field in moved.values():
        monkeypatch.setattr(field, "default", field.default + 7)
    now = option_defaults()[command]
    assert {option: now[option] for option in moved} == {option: field.default for option, field in moved.items()}


def test_serve_batch_wait_is_the_settings_in_milliseconds():
    assert option_defaults()["serve"]["--batch-wait-ms"] == ServerSettings().batch_wait * 1000


def documented(page: str) -> dict[str, str]:
    """The options a page's tables list, each with its default cell: rows ``| `--name ...` | default | ... |``."""
    rows = {}
    for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        found = re.fullmatch(r"`(--[a-z0-9-]+)[^`]*`", cells[0]) if line.startswith("|") and len(cells) >= 3 else None
        if found:
            rows[found[1]] = cells[1]
    return rows


def same(cell: str, default: object) -> bool:
    """Whether a table's default cell starts with ``default`` (numbers compared as numbers: ``2e-5``, ``1,024``)."""
    word = cell.split()[0].strip("`") if cell.split() else ""
    if isinstance(default, (int, float)):
        try:
            return float(word.replace(",", "")) == float(default)
        except ValueError:
            return False
    return word == str(default)


@pytest.mark.parametrize("command", sorted(PAGES))
def test_docs_list_each_default(command):
    rows, defaults = documented(PAGES[command]), option_defaults()[command]
    assert [option for option, value in defaults.items() if value is not None and option not in rows] == []
    wrong = {option: (rows[option], value) for option, value in defaults.items()
             if value is not None and option in rows and not same(rows[option], value)}  # fmt: skip
    assert wrong == {}
    assert set(rows) - set(defaults) == set()  # no option the command lacks
