"""Commands run as tasks (`ventilator exec`), run here for real."""

from __future__ import annotations

import sys

from ventilator import shell


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_that_is_utf8_comes_back_as_text() -> None:
    report = shell.run(python("print('caf\\u00e9')"))

    assert report == {"exit_code": 0, "stdout": "café\n", "stderr": ""}


def test_output_that_is_not_utf8_comes_back_as_its_exact_bytes() -> None:
    code = (
        "import sys; sys.stdout.buffer.write(b'\\xff\\x00\\xfe'); "
        "sys.stderr.write('ok')"
    )

    report = shell.run(python(code))

    assert report["stdout"] == b"\xff\x00\xfe"
    assert report["stderr"] == "ok"
