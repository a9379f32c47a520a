"""How the command line answers the library's errors: a call the library
refused as wrong is the user's error (status 2), any other failure one line
naming its type (status 1); neither ends in a traceback. The commands use it,
and so does a map's or an exec's run, which starts its embedded cluster
outside cli.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .errors import UsageError


class Refused(click.ClickException):
    """What the library refused, told as "Error: ..." with status 2, as click
    tells a usage error, but without its "Usage:" banner: the command line
    may be right and the journal, a key file or an address wrong, and the
    banner sent operators to the options."""

    exit_code = 2


def or_usage_error(action: Callable[[], Any]) -> Any:
    """What `action` returns; what it raises, as click's error to end on."""
    try:
        return action()
    except UsageError as exc:
        raise Refused(str(exc)) from exc
    except Exception as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
