"""Field validation for peer messages (pure functions, used by the core).

Every getter raises :class:`Invalid` with a message naming the field; the core
turns that into an ``InvalidArgument`` error reply to the peer.
"""
from __future__ import annotations

U64 = (1 << 64) - 1
NAME_MAX = 15   # Penglai's NAME_LEN is 16 bytes including the NUL


class Invalid(Exception):
    """A field of a peer's message is missing or has the wrong type or range."""


def check_u64(v, what):
    if type(v) is not int or v < 0 or v > U64:
        raise Invalid(f"{what} must be an unsigned 64-bit integer, not {v!r:.40}")
    return v


def get_int(msg, key, default=None):
    v = msg.get(key, default)
    if type(v) is not int or v < -(1 << 63) or v > U64:
        raise Invalid(f"field {key!r} must be an integer, not {v!r:.40}")
    return v


def get_u64(msg, key):
    return check_u64(msg.get(key), f"field {key!r}")


def get_bool(msg, key, default=False):
    v = msg.get(key, default)
    if type(v) is not bool:
        raise Invalid(f"field {key!r} must be a boolean")
    return v


def get_bytes(msg, key, limit):
    v = msg.get(key)
    if type(v) is not bytes:
        raise Invalid(f"field {key!r} must be bytes")
    if len(v) > limit:
        raise Invalid(f"field {key!r} is longer than {limit} bytes")
    return v


def get_str(msg, key, limit, default=None):
    v = msg.get(key, default)
    if type(v) is not str:
        raise Invalid(f"field {key!r} must be a string")
    if len(v) > limit:
        raise Invalid(f"field {key!r} is longer than {limit} characters")
    return v


def get_name(msg, key):
    v = msg.get(key)
    if type(v) is not str or not v or len(v.encode()) > NAME_MAX or "\0" in v:
        raise Invalid(f"field {key!r} must be a name of 1..{NAME_MAX} bytes")
    return v


def get_opt_window(msg, key):
    """``None`` or ``[id, offset, size]`` of unsigned ints."""
    v = msg.get(key)
    if v is None:
        return None
    if type(v) is not list or len(v) != 3:
        raise Invalid(f"field {key!r} must be [id, offset, size]")
    return tuple(check_u64(x, f"field {key!r}") for x in v)
