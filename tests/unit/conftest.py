"""Fixtures for the unit tests: nothing here opens a socket or starts a process."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ventilator.journal import SqliteJournal

_module_numbers = itertools.count()


@pytest.fixture
def make_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Write Python source as a fresh importable module; return the module's name.

    Each module gets a name never used before in this run, and is dropped from
    `sys.modules` afterwards, so no test sees another's module.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(source: str) -> str:
        name = f"ventilator_unit_module_{next(_module_numbers)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the journal tests' SQLite journal lives."""
    return tmp_path / "journal.db"


@pytest.fixture
def journal(path: Path) -> Iterator[SqliteJournal]:
    journal = SqliteJournal(path)
    yield journal
    journal.close()
