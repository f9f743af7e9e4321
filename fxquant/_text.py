"""Text helpers for fxquant's messages."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["listing"]


def listing(items: Iterable[str], limit: int = 20, sep: str = ", ") -> str:
    """``items`` joined by ``sep``, the first ``limit`` of them and a count of the rest.

    >>> listing(["a", "b", "c"], limit=2)
    'a, b, ... (1 more)'
    """
    items = list(items)
    more = f"{sep}... ({len(items) - limit} more)" if len(items) > limit else ""
    return (sep.join(items[:limit]) + more) if items else "(none)"
