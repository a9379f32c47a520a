"""Which functions a worker serves: public functions defined in named modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ventilator.errors import UsageError
from ventilator.registry import load_functions, resolve

MIXED = """
    import json
    from os.path import join
    from math import sqrt

    def square(x):
        return x * x

    def _secret():
        return "no"

    class Shape:
        def area(self):
            return 0

    halve = lambda x: x / 2
    CONSTANT = 3
"""

MakeModule = Callable[[str], str]


def test_public_functions_are_served_as_module_colon_name(
    make_module: MakeModule,
) -> None:
    name = make_module(MIXED)

    functions = load_functions([name])

    assert sorted(functions) == [f"{name}:halve", f"{name}:square"]
    assert functions[f"{name}:square"](7) == 49


def test_private_imported_and_non_functions_are_not_served(
    make_module: MakeModule,
) -> None:
    name = make_module(MIXED)

    served = {key.split(":")[1] for key in load_functions([name])}

    assert not served & {"_secret", "join", "sqrt", "json", "Shape", "CONSTANT"}


def test_functions_of_several_modules_are_merged(make_module: MakeModule) -> None:
    first = make_module("def a():\n    return 1\n")
    second = make_module("def b():\n    return 2\n")

    assert sorted(load_functions([first, second])) == [f"{first}:a", f"{second}:b"]


def test_module_without_public_functions_is_refused_naming_it(
    make_module: MakeModule,
) -> None:
    name = make_module("def _hidden():\n    pass\nVALUE = 1\n")

    with pytest.raises(UsageError, match=f"{name}.*no public function"):
        load_functions([name])


def test_module_that_does_not_exist_is_refused_naming_it() -> None:
    with pytest.raises(UsageError, match="'no_such_module_here'"):
        load_functions(["no_such_module_here"])


def test_resolve_finds_a_public_function(make_module: MakeModule) -> None:
    name = make_module(MIXED)

    assert resolve(f"{name}:square")(3) == 9


@pytest.mark.parametrize("bad", ["square", ":square", "module:", ""])
def test_resolve_refuses_a_name_without_module_and_function(bad: str) -> None:
    with pytest.raises(UsageError, match="expected MODULE:FUNCTION"):
        resolve(bad)


@pytest.mark.parametrize("missing", ["cube", "_secret", "join", "Shape"])
def test_resolve_refuses_what_is_not_served_naming_it_and_the_choices(
    make_module: MakeModule, missing: str
) -> None:
    name = make_module(MIXED)

    with pytest.raises(UsageError) as caught:
        resolve(f"{name}:{missing}")

    message = str(caught.value)
    assert f"no public function {missing!r}" in message
    assert "it has: halve, square" in message


def test_resolve_in_a_module_without_functions_says_none(
    make_module: MakeModule,
) -> None:
    name = make_module("VALUE = 1\n")

    with pytest.raises(UsageError, match="it has: none"):
        resolve(f"{name}:anything")


def test_resolve_refuses_a_missing_module_naming_it() -> None:
    with pytest.raises(UsageError, match="'no_such_module_here'"):
        resolve("no_such_module_here:f")


@pytest.mark.parametrize(
    "source", ["def broken(:\n    pass\n", "raise RuntimeError('no config')\n"]
)
def test_module_that_fails_to_import_is_refused_naming_it(
    make_module: MakeModule, source: str
) -> None:
    name = make_module(source)

    with pytest.raises(UsageError, match=name):
        load_functions([name])


MDP_MODULE = """
    import ventilator

    @ventilator.mdp_service("echo")
    def echo(body):
        return body

    def plain(x):
        return x
"""


def test_an_mdp_service_is_served_under_its_queue_too(make_module: MakeModule) -> None:
    name = make_module(MDP_MODULE)

    functions = load_functions([name])

    assert sorted(functions) == ["mdp:echo", f"{name}:echo", f"{name}:plain"]
    assert functions["mdp:echo"] is functions[f"{name}:echo"]


@pytest.mark.parametrize("service", ["", "mmi.service", "titanic.reply", "x" * 257])
def test_mdp_service_refuses_names_it_cannot_serve(service: str) -> None:
    from ventilator import mdp_service

    with pytest.raises(UsageError, match="cannot serve MDP service"):
        mdp_service(service)
