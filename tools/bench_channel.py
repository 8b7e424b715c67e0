"""Which client channel design costs less on the call path?

Measures one request/reply round trip to an echo peer process over SOCK_SEQPACKET:

* ``raw``      plain ``send`` + ``recv`` of msgpack frames (the floor);
* ``plain``    tvmrt's wire functions and region table, one thread, no matching
               (what the enclave runtime did before the channel);
* ``channel``  tvmrt's :class:`~tvmrt._channel.Channel`: the waiting thread reads its
               own reply (leader/follower), unsolicited messages applied by the reader;
* ``thread``   the alternative: a reader thread owns the socket and hands each reply to
               the waiting thread through a ``threading.Event``.

Run pinned and unpinned:  ``taskset -c 0 python tools/bench_channel.py`` and
``python tools/bench_channel.py``.  Prints medians and p99 in µs and ratios to raw.
"""
from __future__ import annotations

import gc
import os
import socket
import statistics
import sys
import threading
import time

import msgpack

from tvmrt import _wire
from tvmrt._channel import Channel
from tvmrt._regions import RegionTable

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
ROUNDS = 3


def echo(sock):
    buf = bytearray(65536)
    while True:
        n = sock.recv_into(buf)
        if not n:
            os._exit(0)
        m = msgpack.unpackb(bytes(buf[:n]))
        m["op"] = "r"
        sock.send(msgpack.packb(m))


class ThreadChannel:
    """A reader thread hands replies to waiters (the design not taken)."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()
        self.slots: dict[int, list] = {}
        self.next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                m, fds = _wire.recv(self.sock, want_fds=True)
            except Exception:
                return
            slot = self.slots.pop(m.get("rid"), None)
            if slot is not None:
                slot[1] = m
                slot[0].set()

    def request(self, msg):
        self.next += 1
        rid = msg["rid"] = self.next
        slot = [threading.Event(), None]
        self.slots[rid] = slot
        _wire.send(self.sock, msg)
        slot[0].wait()
        return slot[1]


def timed(fn, n):
    out = []
    perf = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(n):
            t0 = perf()
            fn(i)
            out.append(perf() - t0)
    finally:
        gc.enable()
    return out[100:]


def main():
    samples: dict[str, list] = {"raw": [], "plain": [], "channel": [], "thread": []}
    for _round in range(ROUNDS):
        for kind in samples:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:
                a.close()
                echo(b)
            b.close()
            if kind == "raw":
                buf = bytearray(65536)

                def raw(i, a=a, buf=buf):
                    a.send(msgpack.packb({"op": "call", "rid": i, "a": [i, 0, 0, 0, 0, 0]}))
                    n = a.recv_into(buf)
                    msgpack.unpackb(bytes(buf[:n]))
                fn = raw
            elif kind == "plain":
                table = RegionTable()

                def plain(i, a=a, table=table):
                    _wire.send(a, {"op": "call", "rid": i, "a": [i, 0, 0, 0, 0, 0]})
                    m, fds = _wire.recv(a, want_fds=True)
                    table.apply(m, fds)
                fn = plain
            elif kind == "channel":
                ch = Channel(a, RegionTable(), name="echo")

                def chan(i, ch=ch):
                    ch.request({"op": "call", "a": [i, 0, 0, 0, 0, 0]})
                fn = chan
            else:
                tc = ThreadChannel(a)

                def thr(i, tc=tc):
                    tc.request({"op": "call", "a": [i, 0, 0, 0, 0, 0]})
                fn = thr
            samples[kind] += timed(fn, N // ROUNDS + 100)
            a.shutdown(socket.SHUT_RDWR)      # wakes the reader thread's recv too
            a.close()
            os.waitpid(pid, 0)
    aff = os.sched_getaffinity(0)
    print(f"{N} round trips per design, {ROUNDS} rounds, CPUs {sorted(aff)}")
    raw_med = statistics.median(samples["raw"])
    for kind, xs in samples.items():
        xs.sort()
        med = statistics.median(xs)
        p99 = xs[int(len(xs) * 0.99)]
        print(f"{kind:8} median {med / 1000:7.1f} µs  p99 {p99 / 1000:7.1f} µs  "
              f"{med / raw_med:5.2f}× raw")


if __name__ == "__main__":
    main()
