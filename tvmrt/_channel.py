"""The one request/reply channel of a client (a host connection, an enclave runtime).

Every request carries an id (``rid``) and its reply names it, so any number of
threads may call at once and each gets its own reply.  Whichever waiting thread
holds the *read turn* (a lock) receives **one** message, applies it and hands it
out, then gives the turn back: a reply goes to the thread that waits for its rid
(a reply nobody waits for any more -- its request timed out -- is dropped), an
unsolicited message (``start``, ``call``, a refused ``ret``) to
:meth:`Channel.next_event`.  Grants and drops riding on any message are applied to
the region table at once, by the reader, whoever the message is for.

No thread is added to the call path: the waiting thread reads its own reply (a
reader thread handing replies over costs 2-3x more per call here: see
``tools/bench_channel.py`` and docs/design.md).  A region that comes back while
nobody waits (a loan returned after an intermediate server died) is applied

* when a view or lookup misses (:attr:`RegionTable.refresh` drains the socket
  without blocking), and
* by a *watcher* thread that exists only while this process has lent a region that
  no reply brought back, so that raw pointer access works too.

Every wait has a deadline; :meth:`Channel.close` from any thread wakes every
waiter with :class:`ChannelClosed`; a monitor that goes away wakes them with
:class:`MonitorGone`.
"""
from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections import deque
from typing import NoReturn

from . import _wire
from ._regions import Loan, RegionTable
from .errors import (
    ChannelClosed,
    ChannelError,
    MonitorGone,
    RemoteProtocolError,
    Timeout,
    TvmError,
    error_for,
)

#: extra seconds a client waits beyond a deadline the monitor enforces itself
BACKSTOP = 5.0
_DONTWAIT = socket.MSG_DONTWAIT
#: replies kept for waiters at most (far more than threads that can wait at once)
_UNCLAIMED = 4096
#: how long one blocking wait for the read turn lasts before conditions are re-checked
_TURN_SLICE = 0.5


class Channel:
    """Requests, replies and unsolicited messages over one SOCK_SEQPACKET socket.

    Thread-safe.  A SEQPACKET ``send`` is one atomic message, so senders need no
    lock; readers take turns through ``_turn``.
    """

    __slots__ = ("sock", "table", "name", "_fd", "_rx", "_turn", "_ids", "_replies",
                 "_abandoned", "_events", "_broken", "_closed", "_watcher", "_watch_lock",
                 "_cv", "_followers", "backstop")

    def __init__(self, sock: socket.socket, table: RegionTable, name: str = "monitor"):
        self.sock = sock
        self.table = table
        self.name = name
        table.refresh = self.drain
        self._fd = sock.fileno()
        self._rx = _wire.Receiver()       # used by the holder of the read turn only
        # The read turn: a one-token list.  ``pop()`` takes it without blocking (an
        # atomic test-and-set under the GIL), ``append`` gives it back; on the call
        # path this costs a fraction of a Lock's acquire/release (docs/design.md).
        self._turn: list[int] = [1]
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}   # handed out, not yet taken by their waiter
        self._abandoned: set[int] = set()     # rids whose waiter gave up (timed out, closed)
        self._events: deque[dict] = deque(maxlen=4096)
        self._broken: TvmError | None = None
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._watch_lock = threading.Lock()
        self._cv = threading.Condition(threading.Lock())
        self._followers = 0               # threads waiting on _cv for the turn or a reply
        #: seconds this side waits past a deadline the monitor enforces itself
        self.backstop = BACKSTOP

    # ------------------------------------------------------------------ requests
    def request(self, msg: dict, fds=(), timeout: float | None = None,
                loan: Loan | None = None) -> dict:
        """Send ``msg`` and wait for its reply; raise the error the monitor answered.

        ``timeout`` (seconds) bounds the wait; the monitor enforces the deadlines it
        is told about, this side waits :attr:`backstop` longer and then raises
        :class:`Timeout` itself.  ``loan`` is rolled back if the request cannot be
        sent; once sent, only the monitor's grants move the region.
        """
        if self._broken is not None or self._closed:
            if loan is not None:
                self.table.rollback(loan)
            self._raise_down()
        rid = msg["rid"] = next(self._ids)
        try:
            _wire.send(self.sock, msg, fds)
        except BaseException as exc:
            if loan is not None:
                self.table.rollback(loan)
            if isinstance(exc, MonitorGone):
                self._last_word()
            raise
        reply: dict | None
        if timeout is None:
            turn = self._turn
            try:
                turn.pop()
            except IndexError:
                reply = self._wait(rid, None)          # another thread reads: follow it
            else:
                # the uncontended call path: read until our reply comes
                reply = self._replies.pop(rid, None) if self._replies else None
                try:
                    while reply is None:
                        got = self._read_one(None)
                        if got is None:                 # the channel broke
                            break
                        if got.get("rid") == rid:
                            reply = got
                        else:
                            self._hand_out(got)
                except BaseException:
                    self._abandon(rid)
                    raise
                finally:
                    turn.append(1)
                    if self._followers:
                        self._wake()
                if reply is None:
                    self._raise_down()
        else:
            reply = self._wait(rid, time.monotonic() + timeout + self.backstop)
        if self.table.lent and self._watcher is None:
            self._start_watcher()
        if reply["op"] == "e":
            raise error_for(reply.get("c"), str(reply.get("why", "")))
        return reply

    def notify(self, msg: dict) -> None:
        """Send a notification (no reply expected)."""
        if self._closed or self._broken is not None:
            self._raise_down()
        try:
            _wire.send(self.sock, msg)
        except MonitorGone:
            self._last_word()
            raise

    def _last_word(self) -> None:
        """A send found the monitor gone: raise what it said before it closed (a
        ``bye`` with its reason), if anything is still in the socket."""
        self.drain()
        b = self._broken
        if b is not None and not isinstance(b, ChannelError):
            self._raise_down()

    def next_event(self, timeout: float | None = None) -> dict:
        """The next unsolicited message that is not a bare grant (``start``, ``call``,
        a refused ``ret``), waiting for it."""
        if timeout is not None:
            return self._wait(None, time.monotonic() + timeout)
        turn = self._turn
        try:
            turn.pop()
        except IndexError:
            return self._wait(None, None)               # another thread reads: follow it
        # the server's call path: read until an event comes
        events = self._events
        ev = events.popleft() if events else None
        try:
            while ev is None:
                msg = self._read_one(None)
                if msg is None:                         # the channel broke
                    break
                if msg.get("rid") is None and msg["op"] != "grant":
                    ev = msg
                else:
                    self._hand_out(msg)
        finally:
            turn.append(1)
            if self._followers:
                self._wake()
        if ev is None:
            self._raise_down()
        return ev

    def _raise_down(self) -> NoReturn:
        """Raise why the channel is down (closed here, or broken)."""
        if self._closed:
            raise ChannelClosed(f"the connection to the {self.name} is closed")
        b = self._broken
        if b is not None:
            raise type(b)(b.reason)
        raise MonitorGone(f"the connection to the {self.name} failed")

    # ------------------------------------------------------------------ reading
    def _wait(self, rid: int | None, deadline: float | None) -> dict:
        """Wait for reply ``rid`` (or the next event when ``rid`` is None), reading
        while the read turn is free.

        Uncontended (one thread), this is a non-blocking lock acquire around one
        ``recv``.  The holder of the turn reads until its own message comes, handing
        out the others (and waking their waiters); a thread that finds the turn taken
        waits on ``_cv`` until something is handed out to it or the turn is free.
        A waiter that gives up (deadline, close, interrupt) leaves its rid abandoned:
        the reply that still comes is dropped, its grants applied.
        """
        replies = self._replies
        events = self._events
        turn = self._turn
        remaining = None
        try:
            while True:
                if turn and self._take_turn():
                    mine = None
                    try:
                        # what another reader handed out before the turn was ours
                        if rid is not None:
                            if replies:
                                mine = replies.pop(rid, None)
                        elif events:
                            mine = events.popleft()
                        while mine is None and self._broken is None and not self._closed:
                            if deadline is not None:
                                remaining = deadline - time.monotonic()
                                if remaining <= 0:
                                    break
                            msg = self._read_one(remaining)
                            if msg is None:
                                continue
                            # ours: the reply naming rid, or (rid None) an event
                            if msg.get("rid") == rid and (rid is not None
                                                          or msg["op"] != "grant"):
                                mine = msg
                            else:
                                self._hand_out(msg)
                    finally:
                        self._release_turn()
                    if mine is not None:
                        return mine
                else:
                    if rid is not None:
                        if replies:
                            mine = replies.pop(rid, None)
                            if mine is not None:
                                return mine
                    elif events:
                        return events.popleft()
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                    if (self._broken is None and not self._closed
                            and (remaining is None or remaining > 0)):
                        self._follow(rid, remaining)
                        continue
                if self._broken is not None or self._closed:
                    self._raise_down()
                if deadline is not None and deadline <= time.monotonic():
                    raise Timeout(f"no answer from the {self.name} in time")
        except BaseException:
            if rid is not None:
                self._abandon(rid)
            raise

    def _abandon(self, rid: int) -> None:
        """The waiter of ``rid`` gives up: its reply, if it still comes, is dropped
        (its grants applied)."""
        self._abandoned.add(rid)
        if self._replies.pop(rid, None) is not None:
            self._abandoned.discard(rid)

    def _take_turn(self) -> bool:
        """Take the read turn if it is free (never blocks)."""
        try:
            self._turn.pop()
        except IndexError:
            return False
        return True

    def _release_turn(self) -> None:
        """Give the read turn back and wake whoever waits for it or for a reply."""
        self._turn.append(1)
        if self._followers:
            self._wake()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _follow(self, rid: int | None, remaining: float | None) -> None:
        """Wait until the reader hands something out or gives the turn back."""
        cv = self._cv
        with cv:
            self._followers += 1
            try:
                if rid is not None:
                    ready = rid in self._replies
                else:
                    ready = bool(self._events)
                if not (ready or self._closed or self._broken is not None
                        or self._turn):
                    cv.wait(_TURN_SLICE if remaining is None else min(remaining, _TURN_SLICE))
            finally:
                self._followers -= 1

    def _read_one(self, remaining: float | None, flags: int = 0) -> dict | None:
        """Holding the turn: receive one message and apply its grants.  None when
        nothing came in ``remaining`` seconds (or at once, ``flags`` MSG_DONTWAIT);
        marks the channel broken when the monitor went away or sent garbage."""
        try:
            if remaining is not None:
                ready, _, _ = select.select((self._fd,), (), (), max(remaining, 0.0))
                if not ready:
                    return None
            msg, fds = self._rx.recv(self.sock, True, flags)
            if fds or msg.get("g") or msg.get("d"):
                self.table.apply(msg, fds)
            if msg["op"] == "bye":
                # the monitor says why it disconnects us (refused uid, out of fds)
                self._mark_broken(error_for(msg.get("c"), str(msg.get("why", ""))))
                return None
            return msg
        except BlockingIOError:
            return None
        except (TvmError, OSError, ValueError) as exc:
            self._mark_broken(exc)
        return None

    def _mark_broken(self, exc: BaseException) -> None:
        """The socket gave EOF, an error or garbage: every waiter learns why."""
        if self._broken is not None:
            return
        if isinstance(exc, RemoteProtocolError) or (
                isinstance(exc, TvmError) and not isinstance(exc, ChannelError)):
            self._broken = exc                # the monitor's own reason (bye) or garbage
        elif self._closed:
            self._broken = ChannelClosed(f"the connection to the {self.name} was closed")
        else:
            self._broken = MonitorGone(f"the {self.name} closed the connection")

    def _hand_out(self, msg: dict) -> None:
        """Holding the turn: keep a message that is not the reader's own for its
        waiter (a reply) or for :meth:`next_event`, and wake the waiters."""
        rid = msg.get("rid")
        if rid is None:
            if msg["op"] == "grant":
                return                          # applied already; nobody waits for it
            self._events.append(msg)
        else:
            abandoned = self._abandoned
            if rid in abandoned:
                abandoned.discard(rid)          # its request gave up: grants applied
                return
            replies = self._replies
            replies[rid] = msg
            if rid in abandoned:                # it gave up meanwhile
                abandoned.discard(rid)
                replies.pop(rid, None)
            elif len(replies) > _UNCLAIMED:
                # replies nobody asked for (a monitor bug): never hoarded
                replies.pop(next(iter(replies)), None)
        if self._followers:
            self._wake()

    def drain(self) -> None:
        """Apply every message already waiting, without blocking (a view missed)."""
        if self._closed or self._broken is not None:
            return
        if not self._take_turn():
            return                    # someone is reading: it applies what comes
        try:
            while True:
                msg = self._read_one(None, _DONTWAIT)
                if msg is None:
                    break
                self._hand_out(msg)
        finally:
            self._release_turn()

    # ------------------------------------------------------------------ the watcher
    def _start_watcher(self) -> None:
        with self._watch_lock:
            if self._watcher is not None or self._closed:
                return
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"tvmrt-{self.name}-watcher")
            self._watcher.start()

    def _watch(self) -> None:
        """While this process has lent regions that no reply brought back, apply what
        arrives even when no thread waits (raw pointers then work at once)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while self.table.lent and not self._closed and self._broken is None:
                if not poller.poll(_TURN_SLICE * 1000):
                    continue
                if not self._take_turn():
                    self._follow(-1, None)    # a waiting thread reads: let it finish
                    continue
                try:
                    msg = self._read_one(None, _DONTWAIT)
                    if msg is not None:
                        self._hand_out(msg)
                finally:
                    self._release_turn()
        finally:
            with self._watch_lock:
                self._watcher = None
            if self.table.lent and not self._closed and self._broken is None:
                self._start_watcher()          # lent again right as we stopped

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close from any thread: every waiter wakes with :class:`ChannelClosed`."""
        if self._closed:
            return
        self._closed = True
        with self._cv:
            self._cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes a reader blocked in recv
        except OSError:
            pass
        w = self._watcher
        if w is not None and w is not threading.current_thread():
            w.join(2 * _TURN_SLICE + 1)
        # the fd itself goes once no thread can be inside recv on it any more (a reader
        # woken by the shutdown gives the turn back at once)
        deadline = time.monotonic() + 5.0
        while not self._take_turn():
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        try:
            self.sock.close()
        finally:
            self._release_turn()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def down(self) -> bool:
        """Closed here, or the monitor went away (or was refused)."""
        return self._closed or self._broken is not None
