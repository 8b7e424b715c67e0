"""The client channel and region table against a peer written here with plain sockets.

The peer is a real process-side socket end driven by a thread of this test (it plays
the monitor's part of protocol v2); the channel, the wire code and the region table
under test are the real ones.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time

import msgpack
import pytest

from tvmrt import _memory as memory, _wire as wire
from tvmrt._channel import Channel
from tvmrt._layout import ARENAS, PAGE
from tvmrt._regions import RegionTable
from tvmrt.errors import (
    BadSize,
    ChannelClosed,
    InvalidArgument,
    MonitorGone,
    NotOwned,
    PeerDied,
    RemoteProtocolError,
    Timeout,
    Unaligned,
)

pytestmark = pytest.mark.timeout(30)

# far from anything the session's monitor hands out (it allocates from the arena base)
BASE = ARENAS["mmap"][0] + ARENAS["mmap"][1] - 64 * PAGE


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def send(sock, msg, fds=()):
    wire.send(sock, msg, fds)


def recv(sock):
    return wire.recv(sock, want_fds=True)[0]


def segment(size=PAGE) -> int:
    fd = os.memfd_create("tvmrt-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def chan():
    memory.reserve_arenas()
    a, b = pair()
    table = RegionTable()
    ch = Channel(a, table, name="test peer")
    ch.backstop = 0.0
    yield ch, b
    ch.close()
    table.drop_all()
    b.close()


# ---------------------------------------------------------------- the wire
def test_last_words_survive_a_reset():
    """A peer that closes with unread data makes recv report ECONNRESET first; the
    frames it sent before closing must still be read, then EOF."""
    a, b = pair()
    send(b, {"op": "unread by a"})
    for i in range(3):
        send(a, {"op": "last", "i": i})
    a.close()
    got = []
    with pytest.raises(MonitorGone):
        while True:
            got.append(wire.recv(b)[0]["i"])
    b.close()
    assert got == [0, 1, 2]


def test_encode_refuses_out_of_range_values_with_a_code():
    with pytest.raises(InvalidArgument):
        wire.encode({"op": "x", "size": 1 << 64})


# ---------------------------------------------------------------- matching replies
def test_concurrent_requests_each_get_their_own_reply(chan):
    ch, peer = chan
    got = {}

    def call(i):
        got[i] = ch.request({"op": "echo", "i": i})["i"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    reqs = [recv(peer) for _ in range(8)]
    for m in reversed(reqs):                      # answer in the opposite order
        send(peer, {"op": "r", "rid": m["rid"], "i": m["i"]})
    for t in threads:
        t.join(10)
    assert got == {i: i for i in range(8)}


def test_error_reply_raises_the_coded_exception(chan):
    ch, peer = chan
    t = threading.Thread(target=lambda: send(peer, {"op": "e", "rid": recv(peer)["rid"],
                                                    "c": BadSize.code, "why": "too big"}))
    t.start()
    with pytest.raises(BadSize, match="too big"):
        ch.request({"op": "x"})
    t.join()


def test_unsolicited_messages_wait_for_next_event(chan):
    """A 'start' that arrives while a request waits is kept for next_event, not taken
    as the reply (a request at module level must not eat start)."""
    ch, peer = chan

    def monitor():
        m = recv(peer)
        send(peer, {"op": "start", "args": [1, 2, 3, 4, 5]})
        send(peer, {"op": "r", "rid": m["rid"], "handle": 7})

    t = threading.Thread(target=monitor)
    t.start()
    assert ch.request({"op": "acquire", "name": "x"})["handle"] == 7
    assert ch.next_event(timeout=5)["op"] == "start"
    t.join()


def test_late_reply_after_timeout_is_discarded(chan):
    ch, peer = chan
    with pytest.raises(Timeout):
        ch.request({"op": "slow"}, timeout=0.1)
    m = recv(peer)
    send(peer, {"op": "r", "rid": m["rid"], "late": True})
    t = threading.Thread(target=lambda: send(peer, {"op": "r", "rid": recv(peer)["rid"]}))
    t.start()
    assert "late" not in ch.request({"op": "next"})
    t.join()
    assert not ch._replies and not ch._abandoned          # nothing kept for anybody


def test_replies_nobody_asked_for_are_not_hoarded(chan):
    ch, peer = chan

    def monitor():
        m = recv(peer)
        for rid in range(10_000, 15_000):                 # a confused monitor
            send(peer, {"op": "r", "rid": rid})
        send(peer, {"op": "r", "rid": m["rid"], "mine": True})

    t = threading.Thread(target=monitor)
    t.start()
    assert ch.request({"op": "x"})["mine"]
    t.join()
    assert len(ch._replies) <= 4096


def test_close_from_another_thread_wakes_every_waiter(chan):
    ch, peer = chan
    errors = []

    def wait():
        try:
            ch.request({"op": "never answered"})
        except Exception as exc:              # noqa: BLE001 - the type is the assertion
            errors.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        recv(peer)
    ch.close()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 3 and all(isinstance(e, ChannelClosed) for e in errors)
    with pytest.raises(ChannelClosed):
        ch.request({"op": "after close"})


def test_peer_going_away_wakes_waiters_with_monitor_gone(chan):
    ch, peer = chan
    t = threading.Thread(target=lambda: (recv(peer), peer.close()))
    t.start()
    with pytest.raises(MonitorGone):
        ch.request({"op": "x"})
    t.join()


# ---------------------------------------------------------------- grants and loans
def grant(peer, vaddr, seg=1, size=PAGE, rid=None, op="grant", kind="relay"):
    fd = segment(size)
    msg = {"op": op, "g": [[seg, vaddr, size, 1, kind]]}
    if rid is not None:
        msg["rid"] = rid
    send(peer, msg, [fd])
    os.close(fd)


def test_grant_riding_on_a_reply_is_applied(chan):
    ch, peer = chan
    t = threading.Thread(target=lambda: grant(peer, BASE, rid=recv(peer)["rid"], op="r"))
    t.start()
    ch.request({"op": "mmap"})
    t.join()
    v = ch.table.view(BASE, PAGE)
    v[0] = 7
    assert ch.table.owns(BASE)


def test_returned_loan_is_usable_at_once_through_views(chan):
    """An unsolicited grant (a loan coming back while nothing waits) is applied as soon
    as a view is asked for."""
    ch, peer = chan
    grant(peer, BASE)
    assert ch.table.view(BASE, 4).cast("i")[0] == 0      # the lookup drained the socket


def test_returned_loan_is_usable_by_raw_pointer_without_any_request(chan):
    """The watcher applies a grant while nobody reads, so raw access works."""
    ch, peer = chan
    t = threading.Thread(target=lambda: grant(peer, BASE, rid=recv(peer)["rid"], op="r"))
    t.start()
    ch.request({"op": "mmap"})
    t.join()
    loan = ch.table.lend(BASE, PAGE)
    t = threading.Thread(target=lambda: send(peer, {"op": "e", "rid": recv(peer)["rid"],
                                                    "c": -16, "why": "server died"}))
    t.start()
    with pytest.raises(PeerDied):             # the loan is still out
        ch.request({"op": "call"}, loan=loan)
    t.join()
    assert BASE in ch.table.lent
    send(peer, {"op": "grant", "g": [[1, BASE, PAGE, 0, "relay"]]})
    deadline = time.monotonic() + 5
    while BASE not in ch.table.owned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert BASE in ch.table.owned                        # nobody asked: the watcher did it
    ctypes.c_int.from_address(BASE).value = 5            # would be SIGSEGV if not applied


def test_lend_validates_before_revoking(chan):
    ch, peer = chan
    grant(peer, BASE, size=2 * PAGE)
    table = ch.table
    table.view(BASE, 1)
    with pytest.raises(InvalidArgument):
        table.lend(BASE, 1 << 64)
    with pytest.raises(Unaligned):
        table.lend(BASE + 8, PAGE)
    with pytest.raises(BadSize):
        table.lend(BASE, PAGE)                            # not the whole region
    with pytest.raises(NotOwned):
        table.lend(BASE + 16 * PAGE, PAGE)
    assert table.view(BASE, 4).cast("i")[0] == 0          # still ours, still readable


def test_request_that_cannot_be_encoded_rolls_the_loan_back(chan):
    ch, peer = chan
    grant(peer, BASE)
    ch.table.view(BASE, 1)
    loan = ch.table.lend(BASE, PAGE)
    with pytest.raises(InvalidArgument):
        ch.request({"op": "call", "a": [1 << 64]}, loan=loan)
    assert ch.table.owns(BASE)
    ctypes.c_int.from_address(BASE).value = 1             # RW again


def test_views_raise_while_the_region_is_away(chan):
    ch, peer = chan
    grant(peer, BASE)
    v = ch.table.view(BASE, PAGE)
    ints = v.cast("i")
    part = v[16:32]
    ints[0] = 3
    ch.table.lend(BASE, PAGE)                             # the region leaves
    for stale in (v, ints, part):
        with pytest.raises(ValueError):
            stale[0]
    with pytest.raises(ValueError):
        bytes(ints)
    with pytest.raises(NotOwned):
        ch.table.view(BASE, 4)
    send(peer, {"op": "grant", "g": [[1, BASE, PAGE, 0, "relay"]]})
    assert ch.table.view(BASE, 4).cast("i")[0] == 3       # back: a new view works
    assert ints[0] == 3 and part[0] == 0                  # and the old ones, like a C pointer
    send(peer, {"op": "grant", "d": [1]})
    ch.drain()
    with pytest.raises(ValueError):
        ints[0]                                           # unmapped: dead for good


def test_drop_kills_views(chan):
    ch, peer = chan
    grant(peer, BASE)
    v = ch.table.view(BASE, PAGE).cast("i")
    send(peer, {"op": "grant", "d": [1]})
    ch.drain()
    with pytest.raises(ValueError):
        v[0] = 1


def test_shm_grant_is_shared_not_owned(chan):
    ch, peer = chan
    grant(peer, BASE, kind="shm")
    ch.drain()
    assert BASE in ch.table.shared and BASE not in ch.table.owned
    ch.table.view(BASE, PAGE)[0] = 1


def test_frames_are_msgpack_maps():
    a, b = pair()
    b.send(msgpack.packb([1, 2]))
    with pytest.raises(RemoteProtocolError):
        wire.recv(a)
    a.close()
    b.close()


def test_many_threads_many_requests_none_lost(chan):
    """Four threads, 300 requests each, answered as they come: every thread gets every
    reply (a reply handed out by another reader must never be waited for in recv)."""
    ch, peer = chan
    n, k = 300, 4
    stop = threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # switch threads as often as possible

    def monitor():
        while not stop.is_set():
            try:
                m = recv(peer)
            except Exception:          # noqa: BLE001 - the channel closed: done
                return
            send(peer, {"op": "r", "rid": m["rid"], "i": m["i"]})

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    bad = []

    def client(j):
        for i in range(n):
            if ch.request({"op": "echo", "i": j * n + i})["i"] != j * n + i:
                bad.append((j, i))

    threads = [threading.Thread(target=client, args=(j,)) for j in range(k)]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join(20)
    finally:
        sys.setswitchinterval(old)
        stop.set()
    assert not any(th.is_alive() for th in threads), "a thread is stuck waiting"
    assert bad == []


def test_a_message_whose_fd_cannot_be_received_says_out_of_fds():
    """At EMFILE the kernel drops the fds of a message (MSG_CTRUNC): the receiver gets
    ResourceExhausted (with the message, so a server can refuse that one request),
    not a protocol error about a grant without its fd."""
    a, b = pair()
    pid = os.fork()
    if pid == 0:                                  # pragma: no cover - the child
        code = 1
        try:
            a.close()
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
            hold = []
            try:
                while True:
                    hold.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            try:
                wire.recv(b, want_fds=True)
            except wire.FdsLost as exc:
                code = 0 if exc.msg == {"op": "r", "rid": 3} else 2
        finally:
            os._exit(code)
    b.close()
    fd = segment()
    try:
        send(a, {"op": "r", "rid": 3}, [fd])
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    a.close()
    assert os.waitstatus_to_exitcode(status) == 0
