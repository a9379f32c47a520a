"""A module of tasks that does not import anywhere: a deploy broken from the start."""

from __future__ import annotations

raise RuntimeError("this module does not import, on purpose")
