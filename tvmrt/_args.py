"""Argument checks shared by the host, eapp and region-table layers (pure functions).

Each returns the normalised value or raises :class:`~tvmrt.errors.InvalidArgument`
naming the argument, before anything is sent or changed.
"""
from __future__ import annotations

from ._layout import U64
from .errors import InvalidArgument


def check_u64(value, what: str) -> int:
    """``value`` if it is an int in 0..2**64-1 (not a bool), else InvalidArgument."""
    if type(value) is int and 0 <= value <= U64:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64:
        return int(value)
    raise InvalidArgument(f"{what} must be an unsigned 64-bit integer, not {value!r:.40}")


def check_seconds(value, what: str = "timeout") -> float:
    """A non-negative number of seconds (below 1e9), else InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value < 1e9:
        raise InvalidArgument(f"{what} must be a number of seconds, not {value!r:.40}")
    return float(value)
