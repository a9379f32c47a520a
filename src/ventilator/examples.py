"""Example tasks shipped with ventilator, used by the README's first command.

`analyze_source` reads one Python file and describes it: mapping it over every
`.py` file of the standard library is a real job of a few thousand tasks.
"""

from __future__ import annotations

import ast
import hashlib
import tokenize
from typing import Any

__all__ = ["analyze_source", "square"]


def square(x: float) -> float:
    """Return ``x * x``: the smallest possible task, for benchmarks."""
    return x * x


def analyze_source(path: str) -> dict[str, Any]:
    """Describe the Python source file at `path`.

    Returns:
        lines, bytes, sha256 and, when it parses, the number of functions,
        classes and imports; a file that does not parse (the standard library
        keeps a few on purpose, as test data) gets ``syntax_error`` instead.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as raw:
        data = raw.read()
    summary: dict[str, Any] = {
        "path": path,
        "lines": data.count(b"\n"),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }

    try:
        with tokenize.open(path) as text:  # honours the file's coding declaration
            tree = ast.parse(text.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError) as exc:
        summary["syntax_error"] = str(exc)
        return summary

    nodes = list(ast.walk(tree))
    summary["functions"] = sum(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in nodes
    )
    summary["classes"] = sum(isinstance(n, ast.ClassDef) for n in nodes)
    summary["imports"] = sum(isinstance(n, ast.Import | ast.ImportFrom) for n in nodes)
    return summary
