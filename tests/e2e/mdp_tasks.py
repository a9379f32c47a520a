"""A ventilator worker's handler of an MDP service, for tests/e2e/test_mdp.py."""

from __future__ import annotations

import ventilator


@ventilator.mdp_service("tagged")
def tagged(body: list[bytes]) -> list[bytes]:
    """Echo the body and say who answered."""
    return [*body, b"ventilator"]


@ventilator.mdp_service("single")
def single(body: list[bytes]) -> bytes:
    """Join the body into one frame: a handler may return plain bytes."""
    return b"+".join(body)


@ventilator.mdp_service("refuse")
def refuse(body: list[bytes]) -> bytes:
    """Fail every request: the client must still hear an answer."""
    raise ValueError(f"refused {len(body)} frames")
