"""The README's runnable Python examples run: each list item's example of the
Python section, as a program of its own, against the processes it starts."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, child_env

EXAMPLE_TIMEOUT_S = 60.0
# Indented under a list item: runnable as they stand. The section's opening
# example is a sketch of a project of the reader's own (myproject.tasks).
INDENTED_PYTHON = re.compile(r"\n  ```python\n(.*?)\n  ```", re.S)


def python_section_examples() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return [textwrap.dedent(block) for block in INDENTED_PYTHON.findall(section)]


def test_the_python_section_has_its_examples() -> None:
    examples = python_section_examples()

    assert any("ventilator.Sink(" in example for example in examples)
    assert any("ventilator.Broker(" in example for example in examples)
    assert any("AsyncClient(" in example for example in examples)


@pytest.mark.parametrize("example", python_section_examples())
def test_a_readme_example_runs(example: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")

    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "every example prints what it got"
