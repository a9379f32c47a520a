"""The Python documentation's runnable examples run: each list item's example
of docs/python.md, as a program of its own, against the processes it starts;
and the opening example, which the README keeps, runs from both."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, child_env

EXAMPLE_TIMEOUT_S = 60.0
# Indented under a list item: runnable as they stand, each alone.
INDENTED_PYTHON = re.compile(r"\n  ```python\n(.*?)\n  ```", re.S)
# The page's (and the README's section's) opening: a module of tasks, then
# the script that uses it.
OPENING_PYTHON = re.compile(r"\n```python\n(.*?)\n```", re.S)


def python_page() -> str:
    page = (REPO_ROOT / "docs" / "python.md").read_text(encoding="utf-8")
    assert page.startswith("# Python\n"), "docs/python.md is the Python section"
    return page


def readme_python_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]


def python_page_examples() -> list[str]:
    blocks = INDENTED_PYTHON.findall(python_page())
    return [textwrap.dedent(block) for block in blocks]


def run_example(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script.name],
        cwd=script.parent,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )


def test_the_python_page_has_its_examples() -> None:
    examples = python_page_examples()

    assert any("ventilator.Sink(" in example for example in examples)
    assert any("ventilator.Broker(" in example for example in examples)
    assert any("AsyncClient(" in example for example in examples)


@pytest.mark.parametrize("example", python_page_examples())
def test_a_python_page_example_runs(example: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")

    done = run_example(script)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "every example prints what it got"


@pytest.mark.parametrize(
    "section",
    [readme_python_section, python_page],
    ids=["README.md", "docs/python.md"],
)
def test_the_opening_example_runs_with_its_tasks_module(
    section: Callable[[], str], tmp_path: Path
) -> None:
    tasks, main = OPENING_PYTHON.findall(section())[:2]
    (tmp_path / "tasks.py").write_text(tasks, encoding="utf-8")
    (tmp_path / "main.py").write_text(main, encoding="utf-8")

    done = run_example(tmp_path / "main.py")

    assert done.returncode == 0, done.stderr
    # What its comments promise.
    assert done.stdout.splitlines()[:2] == ["photo.jpg resized to 640 px", "332833500"]


def test_the_embedded_broker_example_runs_with_a_journal(tmp_path: Path) -> None:
    # bind() opens the journal in the caller's thread, serve() commits in
    # another: SQLite refused that, and the broker died on its first commit.
    [example] = [e for e in python_page_examples() if "ventilator.Broker(" in e]
    memory = 'durability="memory",  # no journal file'
    assert memory in example
    journal = tmp_path / "journal.db"
    script = tmp_path / "example.py"
    script.write_text(example.replace(memory, f"journal={str(journal)!r},"), "utf-8")

    done = run_example(script)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "49"
    assert journal.exists()
