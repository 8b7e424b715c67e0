"""The one request/reply channel of a client (a host connection, an enclave runtime).

Every request carries an id (``rid``) and its reply names it, so any number of
threads may call at once and each gets its own reply.  Whichever waiting thread
holds the *read turn* receives the next message and hands it out: a reply to the
thread that waits for its rid (a reply nobody waits for any more -- a request that
timed out -- is dropped), an unsolicited message (``start``, ``call``, a refused
``ret``) to :meth:`Channel.next_event`.  Grants and drops riding on any message are
applied to the region table at once, by the reader, whoever the message is for.

No thread is added to the call path: the waiting thread reads its own reply.  A
region that comes back while nobody waits (a loan returned after an intermediate
server died) is applied

* when a view or lookup misses (:attr:`RegionTable.refresh` drains the socket
  without blocking), and
* by a *watcher* thread that exists only while this process has lent a region
  whose way back no request covers, so that raw pointer access works too.

Every wait has a deadline; :meth:`Channel.close` from any thread wakes every
waiter with :class:`ChannelClosed`; a monitor that goes away wakes them with
:class:`MonitorGone`.
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import threading
import time
from collections import deque

from . import _wire
from ._regions import Loan, RegionTable
from .errors import (ChannelClosed, ChannelError, MonitorGone, RemoteProtocolError, Timeout,
                     TvmError, error_for)

#: extra seconds a client waits beyond a deadline the monitor enforces itself
BACKSTOP = 5.0


class Channel:
    """Requests, replies and unsolicited messages over one SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket, table: RegionTable, name: str = "monitor"):
        self.sock = sock
        self.table = table
        self.name = name
        table.refresh = self.drain
        self._fd = sock.fileno()
        self._send_lock = threading.Lock()
        self._cv = threading.Condition(threading.Lock())
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._waiting: set[int] = set()
        self._events: deque[dict] = deque(maxlen=4096)
        self._reading = False             # someone holds the read turn
        self._waiters = 0                 # threads inside _wait
        self._broken: ChannelError | RemoteProtocolError | None = None
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._watching = False            # the watcher holds the read turn
        self._wake_r = self._wake_w = -1
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
        rid = next(self._ids)
        msg["rid"] = rid
        cv = self._cv
        with cv:
            self._check_open()
            self._waiting.add(rid)
            self._waiters += 1
        try:
            try:
                with self._send_lock:
                    _wire.send(self.sock, msg, fds)
            except BaseException:
                if loan is not None:
                    loan.rollback()
                raise
            deadline = None if timeout is None else time.monotonic() + timeout + self.backstop
            reply = self._wait(rid, deadline)
        except MonitorGone:
            if self._closed:
                raise ChannelClosed(f"the connection to the {self.name} was closed") from None
            raise
        finally:
            with cv:
                self._waiting.discard(rid)
                self._waiters -= 1
                if self._replies:
                    self._replies.pop(rid, None)
        if self.table.lent and self._watcher is None:
            self._start_watcher()
        if reply["op"] == "e":
            raise error_for(reply.get("c"), str(reply.get("why", "")))
        return reply

    def notify(self, msg: dict) -> None:
        """Send a notification (no reply expected)."""
        with self._cv:
            self._check_open()
        with self._send_lock:
            _wire.send(self.sock, msg)

    def next_event(self, timeout: float | None = None) -> dict:
        """The next unsolicited message that is not a bare grant (``start``, ``call``,
        a refused ``ret``), waiting for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._waiters += 1
        try:
            return self._wait(None, deadline)
        finally:
            with self._cv:
                self._waiters -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"the connection to the {self.name} is closed")
        if self._broken is not None:
            raise type(self._broken)(self._broken.reason)

    # ------------------------------------------------------------------ reading
    def _wait(self, rid: int | None, deadline: float | None) -> dict:
        """Wait (the caller counted itself in ``_waiters``) for reply ``rid``, or for
        the next event when ``rid`` is None; read while nobody else does."""
        cv = self._cv
        while True:
            with cv:
                while True:
                    if rid is not None:
                        if self._replies:
                            r = self._replies.pop(rid, None)
                            if r is not None:
                                return r
                    elif self._events:
                        return self._events.popleft()
                    self._check_open()
                    remaining = None
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise Timeout(f"no answer from the {self.name} in time")
                    if not self._reading:
                        self._reading = True
                        break
                    if self._watching:
                        self._wake_watcher()
                    cv.wait(remaining)
            mine = self._read_one(remaining, rid)
            if mine is not None:
                return mine

    def _read_one(self, remaining: float | None, rid: int | None = None) -> dict | None:
        """Holding the read turn: receive at most one message, apply it, hand it out,
        give the turn back.  Returns the message if it is the reply ``rid`` (or the
        event, for ``rid`` None) that the reading thread itself waits for."""
        msg = None
        mine = None
        try:
            if remaining is not None:
                ready, _, _ = select.select((self._fd,), (), (), max(remaining, 0.0))
                if not ready:
                    return None
            msg, fds = _wire.recv(self.sock, want_fds=True)
            self.table.apply(msg, fds)
        except (MonitorGone, RemoteProtocolError, OSError, ValueError) as exc:
            with self._cv:
                if self._broken is None:
                    if isinstance(exc, RemoteProtocolError):
                        self._broken = exc
                    elif self._closed:
                        self._broken = ChannelClosed(f"the connection to the {self.name} "
                                                     f"was closed")
                    else:
                        self._broken = MonitorGone(f"the {self.name} closed the connection")
            msg = None
        finally:
            with self._cv:
                self._reading = False
                if msg is not None:
                    r = msg.get("rid")
                    if r is not None and r == rid:
                        mine = msg
                    elif rid is None and r is None and msg.get("op") != "grant":
                        mine = msg
                    else:
                        self._hand_out(msg)
                if self._waiters > 1 or self._watcher is not None:
                    self._cv.notify_all()
        return mine

    def _hand_out(self, msg: dict) -> None:
        rid = msg.get("rid")
        if rid is not None:
            if rid in self._waiting:
                self._replies[rid] = msg
            # else: a reply whose request gave up (timed out): its grants are applied,
            # the rest is dropped
        elif msg.get("op") != "grant":
            self._events.append(msg)

    def drain(self) -> None:
        """Apply every message already waiting, without blocking (a view missed)."""
        with self._cv:
            if self._reading or self._closed or self._broken is not None:
                return
            self._reading = True
        try:
            while True:
                try:
                    msg, fds = _wire.recv(self.sock, want_fds=True, nonblock=True)
                except BlockingIOError:
                    break
                self.table.apply(msg, fds)
                with self._cv:
                    self._hand_out(msg)
        except (TvmError, OSError):
            pass                      # the next waiter meets the same condition and says so
        finally:
            with self._cv:
                self._reading = False
                self._cv.notify_all()

    # ------------------------------------------------------------------ the watcher
    def _start_watcher(self) -> None:
        with self._cv:
            if self._watcher is not None or self._closed:
                return
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"tvmrt-{self.name}-watcher")
        self._watcher.start()

    def _wake_watcher(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    def _watch(self) -> None:
        """Apply grants while this process has lent regions and nobody else reads."""
        cv = self._cv
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            with cv:
                while not self._closed and self._broken is None and (
                        self._reading or self._waiters or not self.table.lent):
                    cv.wait()
                if self._closed or self._broken is not None:
                    return
                self._reading = self._watching = True
            msg = None
            try:
                events = dict(poller.poll())
                if events.get(self._wake_r):
                    try:
                        os.read(self._wake_r, 512)
                    except OSError:
                        pass
                if events.get(self._fd):
                    msg, fds = _wire.recv(self.sock, want_fds=True, nonblock=True)
                    self.table.apply(msg, fds)
            except BlockingIOError:
                pass
            except (TvmError, OSError, ValueError):
                with cv:
                    if self._broken is None and not self._closed:
                        self._broken = MonitorGone(f"the {self.name} closed the connection")
            finally:
                with cv:
                    self._reading = self._watching = False
                    if msg is not None:
                        self._hand_out(msg)
                    cv.notify_all()

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close from any thread: every waiter wakes with :class:`ChannelClosed`."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes a reader blocked in recv
        except OSError:
            pass
        if self._wake_w != -1:
            self._wake_watcher()
        w = self._watcher
        if w is not None and w is not threading.current_thread():
            w.join(5.0)
        # the fd itself goes when no thread can be inside recv on it any more
        with self._cv:
            while self._reading:
                self._cv.wait(1.0)
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd != -1:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    @property
    def closed(self) -> bool:
        return self._closed
