"""The one schema table (``monitor/schema.py``): every op has exactly one schema and
one handler, the compiled checks agree with the field checkers, and arbitrary messages
from arbitrary peers, checked against it, never break the state machine."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import test_core as T
from core_driver import NOTES, Driver
from tvmrt import _wire as wire, errors as E
from tvmrt.monitor import core as C, schema as S
from tvmrt.monitor.config import Config

CFG = Config(key=b"k" * 32)
U64 = (1 << 64) - 1


def test_every_op_has_one_schema_and_one_handler():
    assert set(S.HOST) == set(C._HOST_OPS)
    assert {k for k, op in S.ENCLAVE.items() if op.request} == set(C._ENCLAVE_OPS)
    assert {k for k, op in S.ENCLAVE.items() if not op.request} == set(C._ENCLAVE_NOTES)
    assert set(NOTES) == set(C._ENCLAVE_NOTES)
    for table in (S.HOST, S.ENCLAVE):
        for name, op in table.items():
            assert op.op == name and op.required <= {k for k, _ in op.fields}


# values a decoder can produce (msgpack: no ext types, ints within -2**63 .. 2**64-1)
ints = st.one_of(st.integers(-3, 5), st.sampled_from([0, 4096, 1 << 30, U64, U64 - 4095,
                                                      -(1 << 63), (1 << 63) - 1]),
                 st.integers(-(1 << 63), U64))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=7), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=12)


def _plausible(key):
    """Mostly values of the right shape for a field, sometimes anything."""
    good = {"a": st.lists(ints, min_size=6, max_size=6), "name": st.text(min_size=1,
                                                                         max_size=16),
            "v": st.lists(ints, max_size=3), "mem": st.one_of(st.none(), ints, st.lists(
                ints, min_size=3, max_size=3)), "shm": st.lists(ints, min_size=3,
                                                               max_size=3),
            "timeout": st.one_of(st.none(), st.floats(-1, 2e9), ints),
            "code": st.binary(max_size=50), "callers": st.one_of(st.just("*"), st.lists(
                st.text(max_size=70), max_size=3))}.get(key, ints)
    return st.one_of(good, good, values)


@st.composite
def messages(draw, table=None):
    """``(table, op, msg, nfds)``: a message built from an op's schema, with fields
    dropped, added, or of the wrong type now and then."""
    table = table or draw(st.sampled_from(["host", "enclave"]))
    ops = S.HOST if table == "host" else S.ENCLAVE
    op = draw(st.sampled_from(sorted(ops)))
    spec = ops[op]
    msg = {"op": op}
    if spec.request or draw(st.integers(0, 9)) == 0:
        msg["rid"] = draw(st.one_of(st.integers(1, 1000), st.integers(1, 1000), values))
    for k, _c in spec.fields:
        if k in spec.required and draw(st.integers(0, 19)) or draw(st.booleans()):
            msg[k] = draw(_plausible(k))
    if draw(st.integers(0, 9)) == 0:
        msg[draw(st.text(max_size=6))] = draw(values)
    nfds = draw(st.sampled_from([0, 0, 0, 2, 1]))
    return table, op, msg, nfds


@settings(max_examples=3000, deadline=None)
@given(messages())
def test_compiled_checks_agree_with_the_field_checkers(m):
    table, op, msg, nfds = m
    spec = (S.HOST if table == "host" else S.ENCLAVE)[op]
    try:
        spec.check(msg, nfds, CFG)
        refused = None
    except S.Invalid as exc:
        refused = str(exc)
    # the compiled check refuses exactly what a walk of the table refuses (its
    # AssertionError, a refusal of something the checkers accept, fails the test)
    assert (refused is None) == (spec.problem(msg, nfds, CFG) is None), (msg, refused)


@pytest.mark.parametrize("msg,nfds,why", [
    ({"op": "ps", "rid": 1}, 1, "fds"),
    ({"op": "create", "rid": 1, "name": "x", "type": 0, "code": b""}, 1, "fds"),
    ({"op": "ps", "rid": 1, "x": 1}, 0, "unknown field 'x'"),
    ({"op": "shmget", "rid": 1}, 0, "'size' is missing"),
    ({"op": "shmget", "rid": 1, "size": True}, 0, "unsigned 64-bit"),
    ({"op": "shmget", "rid": 1, "size": 1.0}, 0, "unsigned 64-bit"),
    ({"op": "shmget", "rid": 1, "size": -1}, 0, "unsigned 64-bit"),
    ({"op": "create", "rid": 1, "name": "x", "type": 0, "code": b"x" * (CFG.max_code + 1)},
     0, "longer than"),
    ({"op": "create", "rid": 1, "name": "x", "type": 1, "code": b"", "instances": 0}, 0,
     "instances must be"),
    ({"op": "rerun", "rid": 1, "handle": 1, "reason": 2}, 0, "RETURN_USER_RELAY_PAGE"),
])
def test_the_table_names_what_is_wrong(msg, nfds, why):
    with pytest.raises(S.Invalid, match=why):
        S.HOST[msg["op"]].check(msg, nfds, CFG)


@pytest.mark.parametrize("msg,why", [
    ({"op": "call", "rid": 1, "handle": 1, "a": [0] * 5}, "call_enclave_arg_t"),
    ({"op": "call", "rid": 1, "handle": 1, "a": [0, 0, 0, 0, 0, -1]}, "unsigned"),
    ({"op": "call", "rid": 1, "handle": 1, "a": [0, 0, 0, 0, 0, 1 << 64]}, "unsigned"),
    ({"op": "call", "rid": 1, "handle": 1, "a": [0, 0, 0, 0, 0, False]}, "unsigned"),
    ({"op": "call", "rid": 1, "handle": 1, "a": [0] * 6, "nb": 1}, "boolean"),
    ({"op": "call", "rid": 1, "handle": 1, "a": [0] * 6, "timeout": -1}, "seconds"),
    ({"op": "ret", "rid": 3, "a": [0] * 6}, "unknown field 'rid'"),
    ({"op": "exit", "v": -1}, "unsigned"),
    ({"op": "acquire", "rid": 1, "name": "x" * 16}, "name of 1..15 bytes"),
    ({"op": "acquire", "rid": 1, "name": "a\0b"}, "name of 1..15 bytes"),
])
def test_enclave_messages_are_checked_the_same_way(msg, why):
    with pytest.raises(S.Invalid, match=why):
        S.ENCLAVE[msg["op"]].check(msg, 0, CFG)


def test_a_refused_call_gives_its_region_back_whatever_was_wrong():
    """The runtime revoked the request region before sending: a refusal for a bad field
    (checked by the schema, before the handler) gives it back like one for a busy
    server (checked by the handler): one mechanism, Core._revoked."""
    d = Driver(T.new_core())
    h, c, [(s, sh)] = T._world(d)
    v = T.mmap(d, c)
    seg = T.seg_at(d, v)
    for bad in ({"timeout": "soon"}, {"nb": 1}, {"handle": 0x7777}):
        kw = {"handle": sh, "a": [0, 0, v, 4096, 0, 0], **bad}
        rep = T.ereq(d, c, "call", **kw)
        assert rep["op"] == "e" and rep["g"] == [[seg, v, 4096, 0, "relay"]], rep
        assert T.owner(d, v) == c
    # naming a region it does not own gets nothing back
    w = T.mmap(d, s)
    rep = T.ereq(d, c, "call", handle=sh, a=[0, 0, w, 4096, 0, 0], nb="x")
    assert rep["op"] == "e" and "g" not in rep and T.owner(d, w) == s
    d.check()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), messages()), max_size=25))
def test_arbitrary_messages_from_arbitrary_peers_never_break_the_core(events):
    """A host, a running caller and a server, each sending schema-shaped messages with
    wrong fields mixed in (from the wrong kind of peer too): the core answers every
    request, keeps every invariant the driver checks, and ends clean."""
    d = Driver(T.new_core())
    h, c, [(s, sh)] = T._world(d)
    v = T.mmap(d, c)
    peers = [h, c, s, d.connect()]
    for who, (_table, _op, msg, nfds) in events:
        peer = peers[who]
        msg = dict(msg)
        # addresses and handles of this world now and then, so that some get far
        for k, real in (("handle", sh), ("vaddr", v)):
            if k in msg and msg[k] == 4096:
                msg[k] = real
        if d.core.peers.get(peer) is None or not d.core.peers[peer].alive:
            continue
        d.message(peer, msg, nfds if d.core.peers[peer].kind == C.HOST else 0)
        d.check()
        for p in peers:
            d.take(p)
    d.finish()


def test_a_bad_field_is_invalid_argument_and_an_unknown_op_a_protocol_error():
    d = Driver(T.new_core())
    h = d.connect()
    T.err(T.hreq(d, h, "shmget", size="big"), E.InvalidArgument)
    T.err(T.hreq(d, h, "nope"), E.LocalProtocolError)
    T.err(T.hreq(d, h, "mmap", size=4096), E.LocalProtocolError)   # an enclave's op
    T.err(T.hreq(d, h, "ps", extra=1), E.InvalidArgument)
    d.check()


@st.composite
def frames(draw):
    """Bytes a peer might send: a schema-shaped message packed, then maybe truncated,
    with a byte changed, or with garbage appended; or any bytes at all."""
    _t, _op, msg, _n = draw(messages())
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        data = b"\xc1"
    how = draw(st.integers(0, 4))
    if how == 1 and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == 2 and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif how == 3:
        data += draw(st.binary(min_size=1, max_size=8))
    elif how == 4:
        data = draw(st.binary(max_size=64))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), frames()), max_size=25))
def test_arbitrary_frames_through_the_decoder_and_the_core(events):
    """What the daemon does with a frame: decode it (a malformed one cuts the peer off:
    ``disconnected``), else hand it to the core; the core keeps every invariant."""
    d = Driver(T.new_core())
    h, c, [(s, sh)] = T._world(d)
    peers = [h, c, s, d.connect()]
    for who, data in events:
        peer = peers[who]
        q = d.core.peers.get(peer)
        if q is None or not q.alive or q.eof:
            continue
        try:
            msg = wire.decode(data)
        except E.RemoteProtocolError:
            d.disconnected(peer)
            if q.kind == C.ENCLAVE:
                d.exited(peer)
        else:
            d.message(peer, msg)
        d.check()
        for p in peers:
            d.take(p)
    d.finish()
