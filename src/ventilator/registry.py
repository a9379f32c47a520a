"""Which functions a worker serves: the public functions of named modules.

A task names its function as ``module:function``. Only functions defined in a
module the worker was started with, whose names do not start with an
underscore, can run: a task cannot reach anything else in the worker's process.

A function marked with `mdp_service` is also served under its Majordomo
service name (queue ``mdp:<service>``): MDP clients' requests for that service
reach it, with the request's body frames as its one argument.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import UsageError
from .mdp import is_reserved, service_queue

__all__ = ["load_functions", "mdp_service", "resolve"]

F = TypeVar("F", bound=Callable[..., Any])

_MDP_SERVICE = "__ventilator_mdp_service__"


def mdp_service(name: str) -> Callable[[F], F]:
    """Mark a function as the handler of Majordomo service `name`.

    The function receives the request's body frames (``list[bytes]``) and
    returns the reply body: ``bytes`` (one frame) or a list of ``bytes``.
    Start a worker on its module as usual; it serves both the function's
    ``module:function`` name and the MDP service.

    Raises:
        UsageError: `name` is empty, too long, or an ``mmi.``/``titanic.``
            service, which the broker answers itself.
    """
    if not name or len(name.encode()) > 256 or is_reserved(name):
        raise UsageError(
            f"cannot serve MDP service {name!r}: names are 1 to 256 bytes and "
            "mmi.* and titanic.* belong to the broker"
        )

    def mark(function: F) -> F:
        setattr(function, _MDP_SERVICE, name)
        return function

    return mark


def load_functions(modules: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """Import `modules` and return their public functions by ``module:function``.

    Raises:
        UsageError: a module cannot be imported, or defines no public function.
    """
    functions: dict[str, Callable[..., Any]] = {}
    for module_name in modules:
        found = _public_functions(module_name)
        if not found:
            raise UsageError(
                f"module {module_name!r} defines no public function to serve"
            )
        functions.update(found)
    return functions


def _public_functions(module_name: str) -> dict[str, Callable[..., Any]]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a syntax error or a failing import is a usage error too
        raise UsageError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc

    public: dict[str, Callable[..., Any]] = {
        f"{module_name}:{name}": function
        for name, function in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(function)
        and function.__module__ == module.__name__
    }
    services = {
        service_queue(getattr(function, _MDP_SERVICE)): function
        for function in public.values()
        if hasattr(function, _MDP_SERVICE)
    }
    return public | services


def resolve(name: str) -> Callable[..., Any]:
    """Find the function a ``module:function`` name points to, importing it.

    Raises:
        UsageError: the name is malformed, or the module or function is missing
            or not public.
    """
    module_name, sep, function_name = name.partition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(f"expected MODULE:FUNCTION, got {name!r}")

    functions = _public_functions(module_name)
    function = functions.get(name)
    if function is None:
        raise UsageError(
            f"module {module_name!r} has no public function {function_name!r}; "
            f"it has: {', '.join(sorted(f.split(':')[1] for f in functions)) or 'none'}"
        )
    return function
