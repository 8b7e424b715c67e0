"""The one schema of every message a peer may send the monitor (pure: no I/O).

:data:`HOST` and :data:`ENCLAVE` map each op a host connection, or an enclave's
channel, may send to its :class:`Op`: whether it is a request (carries a ``rid``, gets
a reply) or a notification, every field it may carry with the field's type and range,
which fields are required, how many fds may come with it, and which regions the
sender's runtime revoked before sending it (given back when the message is refused).

:func:`check` is applied by the core to every decoded frame before its handler runs,
so a handler reads fields that are known to be there and of the right type.  The
decoder (``tvmrt._wire.decode``) has already bounded the frame (``MAX_FRAME``), refused
ext types and non-string map keys, and bounded array and map lengths; what is checked
here: known op, ``rid``, no unknown field, every required field, types (``bool`` is not
an int, an int is not a float), unsigned 64-bit ranges, string and byte lengths, the
fds a message may carry.

Semantic rules (a region is page aligned, a handle names a live enclave the sender
owns, quotas) stay in the core: they depend on its state.

Each checker raises :class:`Invalid` with a message naming the field; the core turns
it into an ``InvalidArgument`` error reply (an unknown op or a request without a rid
into ``LocalProtocolError``).  Nothing here allocates on a valid message.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
NAME_MAX = 15   # Penglai's NAME_LEN is 16 bytes including the NUL
PATH_MAX = 4096
WHY_MAX = 8192
CALLERS_MAX = 64
#: the only rerun reason Penglai accepts (RETURN_USER_RELAY_PAGE)
RERUN_RELAY_PAGE = 1


class Invalid(Exception):
    """A field of a peer's message is missing or has the wrong type or range."""


# ---------------------------------------------------------------------- field types
# A field type is a callable ``(value, field_name, config) -> None`` raising Invalid.
# One may also carry ``fast``: a Python expression in ``{v}``, true exactly when the
# value is valid; :class:`Op` compiles those into one function per op (see there).
Check = Callable[[Any, str, Any], None]


def _fast(expr: str):
    def mark(check):
        check.fast = expr
        return check
    return mark


@_fast("(type({v}) is int and not {v} >> 64)")

def u64(v, key, cfg):
    if type(v) is not int or v < 0 or v > U64:
        raise Invalid(f"field {key!r} must be an unsigned 64-bit integer, not {v!r:.40}")


@_fast("(type({v}) is int and I64_MIN <= {v} <= U64)")
def i64(v, key, cfg):
    """An integer a peer names something by (a handle, an id): signed or unsigned 64-bit,
    so that a negative one is an unknown handle, not a malformed message."""
    if type(v) is not int or v < I64_MIN or v > U64:
        raise Invalid(f"field {key!r} must be an integer, not {v!r:.40}")


@_fast("({v} is True or {v} is False)")
def boolean(v, key, cfg):
    if type(v) is not bool:
        raise Invalid(f"field {key!r} must be a boolean")


def name(v, key, cfg):
    if type(v) is not str or not v or "\0" in v or len(v.encode()) > NAME_MAX:
        raise Invalid(f"field {key!r} must be a name of 1..{NAME_MAX} bytes")


def text(limit: int) -> Check:
    def check(v, key, cfg):
        if type(v) is not str:
            raise Invalid(f"field {key!r} must be a string")
        if len(v) > limit:
            raise Invalid(f"field {key!r} is longer than {limit} characters")
    return check


def code(v, key, cfg):
    """An eapp's source: bytes, at most ``Config.max_code``."""
    if type(v) is not bytes:
        raise Invalid(f"field {key!r} must be bytes")
    if len(v) > cfg.max_code:
        raise Invalid(f"field {key!r} is longer than {cfg.max_code} bytes")


def one_of(*values: int, what: str) -> Check:
    """An int that must be one of ``values`` (``what`` says what they mean)."""
    allowed = frozenset(values)

    def check(v, key, cfg):
        if type(v) is not int or v not in allowed:
            raise Invalid(f"field {key!r} must be {what}, not {v!r:.40}")
    return check


def u64s(n: int | None, what: str) -> Check:
    """A list of unsigned 64-bit ints: exactly ``n`` of them (or any number up to the
    decoder's array bound when ``n`` is None)."""
    def check(v, key, cfg):
        if type(v) is not list or (n is not None and len(v) != n):
            raise Invalid(f"field {key!r} must be {what}")
        for x in v:
            if type(x) is not int or x < 0 or x > U64:
                raise Invalid(f"field {key!r}: {what}, each an unsigned 64-bit integer, "
                              f"not {x!r:.40}")
    if n is not None:       # unrolled: a call's 6 fields are checked on every call
        # every item an int, then their OR below 2**64 (a negative one makes it negative)
        types = "".join(f" and type({{v}}[{i}]) is int" for i in range(n))
        ors = " | ".join(f"{{v}}[{i}]" for i in range(n))
        check.fast = (f"(type({{v}}) is list and len({{v}}) == {n}{types}"  # type: ignore[attr-defined]
                      f" and not ({ors}) >> 64)")
    return check


@_fast("(type({v}) in (int, float) and 0 <= {v} < 1e9)")
def timeout(v, key, cfg):
    if type(v) not in (int, float) or not 0 <= v < 1e9:
        raise Invalid(f"field {key!r} must be a non-negative number of seconds")


def instances(v, key, cfg):
    if type(v) is not int or not 1 <= v <= cfg.max_instances:
        raise Invalid(f"field {key!r}: instances must be 1 .. {cfg.max_instances}, "
                      f"not {v!r:.40}")


def callers(v, key, cfg):
    """Who may call a server: ``"*"``, or a list of enclave names and 32-byte
    measurements."""
    if v == "*":
        return
    if (type(v) is not list or len(v) > CALLERS_MAX or not all(
            (type(x) is str and 0 < len(x) <= 64) or (type(x) is bytes and len(x) == 32)
            for x in v)):
        raise Invalid(f"field {key!r}: callers must be '*' or a list of at most "
                      f"{CALLERS_MAX} enclave names and 32-byte measurements")


def opt(check: Check) -> Check:
    """``check``, or None (the same as absent)."""
    def maybe(v, key, cfg):
        if v is not None:
            check(v, key, cfg)
    fast = getattr(check, "fast", None)
    if fast is not None:
        maybe.fast = f"({{v}} is None or {fast})"    # type: ignore[attr-defined]
    return maybe


def anything(v, key, cfg):
    """Any value the decoder produced: for a field whose bad value has a meaning (a
    fault's code: an unknown one is a plain EnclaveFault; the fault is honoured)."""


window = u64s(3, "[id, offset, size]")
callarg = u64s(6, "the 6 fields of call_enclave_arg_t")


# ---------------------------------------------------------------------- revoked regions
# What a sender's runtime revoked before sending (so must get back if the message is
# refused): ``(by, key)`` pairs, ``by`` "id" or "vaddr".  Tolerant of any input: it is
# asked for refused messages too, whatever they hold.
def _call_region(msg):
    a = msg.get("a")
    if type(a) is list and len(a) == 6 and type(a[2]) is int and a[2]:
        return (("vaddr", a[2]),)
    return ()


def _run_region(msg):
    w = msg.get("mem")
    if type(w) is list and w and type(w[0]) is int:
        return (("id", w[0]),)
    return ()


def _rerun_region(msg):
    m = msg.get("mem")
    return (("id", m),) if type(m) is int else ()


def _rrp_regions(msg):
    v = msg.get("v")
    if type(v) is list:
        return tuple(("vaddr", x) for x in v[:8] if type(x) is int)
    return ()


def _asyn_region(msg):
    v = msg.get("vaddr")
    return (("vaddr", v),) if type(v) is int and v else ()


# ---------------------------------------------------------------------- the table
class Op:
    """One op's schema.  ``fields``: name -> (type, required); ``fds``: the numbers of
    fds it may carry; ``request``: it carries a rid and is answered; ``revokes``: msg ->
    the regions its sender revoked before sending (see above).

    :meth:`check` is compiled from the fields when the table is built: one function
    per op that tests the key set in C and each field with its type's ``fast``
    expression inline (a call and a return cost about what the handlers' own getters
    did), and only for a message that fails walks the fields with their checkers to
    say which one is wrong (:meth:`explain`)."""

    __slots__ = ("op", "fields", "required", "fds", "request", "revokes", "allowed",
                 "check")

    def __init__(self, op: str, fields: dict[str, tuple[Check, bool]], *,
                 fds: tuple[int, ...] = (0,), request: bool = True,
                 revokes: Callable[[dict], tuple] | None = None):
        self.op = op
        self.fields = tuple((k, c) for k, (c, _req) in fields.items())
        self.required = frozenset(k for k, (_c, req) in fields.items() if req)
        self.fds = fds
        self.request = request
        self.revokes = revokes
        #: every key a message of this op may have
        self.allowed = frozenset(fields) | {"op"} | ({"rid"} if request else set())
        self.check: Callable[[dict, int, Any], None] = self._compile()

    def _compile(self):
        """The compiled :meth:`check` (see the class docstring).  It fetches the
        required fields (a KeyError: one is missing), tests each field present, and
        counts the fields it knows: a message with more keys than that has an unknown
        one (a set comparison per message measured 2,500 instructions more)."""
        env: dict[str, Any] = {"U64": U64, "I64_MIN": I64_MIN, "FDS": self.fds,
                               "explain": self.explain}
        fail = "        return explain(msg, nfds, cfg)"
        body = ["def check(msg, nfds, cfg):",
                "    if nfds:" if self.fds == (0,) else "    if nfds not in FDS:",
                fail,
                "    try:"]
        body += [f"        v{i} = msg[{k!r}]" for i, (k, _c) in enumerate(self.fields)
                 if k in self.required] or ["        pass"]
        body += ["    except KeyError:", fail,
                 f"    n = {1 + self.request + len(self.required)}"]
        for i, (k, c) in enumerate(self.fields):
            if k in self.required:
                ind = "    "
            else:
                body += [f"    if {k!r} in msg:", "        n += 1", f"        v{i} = msg[{k!r}]"]
                ind = "        "
            fast = getattr(c, "fast", None)
            if fast is None:
                env[f"c{i}"] = c
                body.append(f"{ind}c{i}(v{i}, {k!r}, cfg)")
            else:
                body += [f"{ind}if not {fast.format(v=f'v{i}')}:", "    " + ind + fail[4:]]
        body += ["    if len(msg) != n:", fail]
        exec("\n".join(body), env)     # our own table's source, not a peer's
        return env["check"]

    def explain(self, msg: dict, nfds: int, cfg) -> None:
        """Raise :class:`Invalid` naming what is wrong with ``msg``
        (:meth:`problem`); the compiled check calls it only for a message it refuses."""
        why = self.problem(msg, nfds, cfg)
        if why is None:     # tests/test_schema.py checks that this cannot happen
            raise AssertionError(f"{self.op!r}: the compiled check refused a message "
                                 f"its field checkers accept")
        raise Invalid(why)

    def problem(self, msg: dict, nfds: int, cfg) -> str | None:
        """What is wrong with ``msg`` (its op and rid already looked at by the caller),
        found by walking the table: the fds, an unknown or a missing field, the first
        field its checker refuses; None if nothing is."""
        if nfds not in self.fds:
            return (f"{self.op!r} may carry {' or '.join(map(str, self.fds))} fds, "
                    f"not {nfds}")
        for k in msg:
            if k not in self.allowed:
                return f"unknown field {k!r:.40} in {self.op!r}"
        for k, _c in self.fields:
            if k in self.required and k not in msg:
                return f"field {k!r} is missing from {self.op!r}"
        for k, c in self.fields:
            if k in msg:
                try:
                    c(msg[k], k, cfg)
                except Invalid as exc:
                    return str(exc)
        return None


REQ, OPT = True, False      # required, optional

#: what a host connection may send (all requests)
HOST: dict[str, Op] = {op.op: op for op in (
    Op("shmget", {"size": (u64, REQ)}),
    Op("sget", {"size": (u64, REQ)}),
    Op("shmat", {"id": (i64, REQ)}),
    Op("sat", {"id": (i64, REQ)}),
    Op("shmdt", {"id": (i64, REQ)}),
    Op("sdt", {"id": (i64, REQ)}),
    Op("shmctl", {"id": (i64, REQ)}),
    Op("sctl", {"id": (i64, REQ)}),
    Op("create", {"name": (name, REQ),
                  "type": (one_of(0, 1, what="0 (normal) or 1 (server)"), REQ),
                  "code": (code, REQ), "path": (text(PATH_MAX), OPT), "shm": (opt(window), OPT),
                  "timeout": (opt(timeout), OPT), "instances": (instances, OPT),
                  "callers": (opt(callers), OPT)},
       fds=(0, 2)),     # stdout and stderr, or none
    Op("run", {"handle": (i64, REQ), "mem": (opt(window), OPT), "timeout": (opt(timeout), OPT)},
       revokes=_run_region),
    Op("rerun", {"handle": (i64, REQ),
                 "reason": (one_of(RERUN_RELAY_PAGE, what="1 (RETURN_USER_RELAY_PAGE)"), REQ),
                 "mem": (opt(i64), OPT), "timeout": (opt(timeout), OPT)},
       revokes=_rerun_region),
    Op("destroy", {"handle": (i64, REQ)}),
    Op("attest", {"handle": (i64, REQ), "nonce": (u64, REQ)}),
    Op("stop", {"handle": (i64, REQ)}),
    Op("resume", {"handle": (i64, REQ)}),
    Op("ps", {}),
)}

#: what an enclave's channel may send: requests and notifications
ENCLAVE: dict[str, Op] = {op.op: op for op in (
    Op("mmap", {"size": (u64, REQ)}),
    Op("unmap", {"vaddr": (u64, REQ), "size": (u64, REQ)}),
    Op("acquire", {"name": (name, REQ)}),
    Op("call", {"handle": (i64, REQ), "a": (callarg, REQ), "nb": (boolean, OPT),
                "timeout": (opt(timeout), OPT)},
       revokes=_call_region),
    Op("report", {"nonce": (u64, REQ), "name": (opt(name), OPT)}),
    Op("key", {"type": (one_of(0, 1, what="0 (ENCLAVE_KEY) or 1 (STORAGE_KEY)"), REQ),
               "size": (i64, REQ)}),
    Op("rrp", {"v": (u64s(None, "the vaddrs of the run's relay regions"), REQ)},
       revokes=_rrp_regions),
    Op("asyn", {"name": (name, REQ), "arg": (u64, REQ), "vaddr": (u64, REQ), "size": (u64, REQ)},
       revokes=_asyn_region),
    Op("split", {"vaddr": (u64, REQ), "size": (u64, REQ), "at": (u64, REQ)}),
    # notifications
    Op("ready", {}, request=False),
    Op("ret", {"a": (callarg, REQ)}, request=False),
    Op("exit", {"v": (u64, REQ)}, request=False),
    Op("fault", {"why": (text(WHY_MAX), OPT), "c": (anything, OPT)}, request=False),
)}
