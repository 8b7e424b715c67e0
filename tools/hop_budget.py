"""Per-hop budget of a null call_enclave against the relay floor's: the CPU time each
process spends per call, and its context switches, from the kernel's own counters.

    python tools/hop_budget.py [--calls N] [--rounds R] [--config null|loan_4k ...] [--forward]

Runs the relay floor (client here, relay, server: ``tvmrt.bench.Floors``), the same
floor with a relay that waits in ``epoll`` as a broker of many peers must ("epoll"),
and tvmrt's null call (caller enclave, monitor, bench-server: ``tvmrt.bench.Tvm``) in alternating
blocks, and reads for every process the run time in ``/proc/PID/schedstat`` (ns on the
CPU) and ``voluntary/nonvoluntary_ctxt_switches`` in ``/proc/PID/status`` before and
after each block.  The floor's client is this thread (``/proc/thread-self``); tvmrt's
caller measures its own loop (``time.thread_time_ns``, written into the shared header
by ``eapps/bench_caller.py``).  CPU time is what each process does, whatever the
machine's load: a budget, not a latency (``tvmrt bench`` gives those).  The "wall"
line is the median latency of the same blocks.

``--forward`` adds a fourth run: tvmrt's null call through a second monitor whose core
handles ``call`` and ``ret`` by forwarding them, nothing else (no schema check, no
ownership, no queue, no state: :data:`_FORWARD_CORE`).  It is the same daemon, wire and
runtimes with the monitor's rules taken out, which is how far a faster state machine
could go: what it leaves above the floor is the shell and the two ends.  A measuring
device only -- never a mode of tvmrt.

Reading another process's /proc files needs the same uid (sandboxed enclaves are
non-dumpable: their /proc files are root's, so run as root to see the server's line).
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import sys
import time

import msgpack

from tvmrt import bench


def _cpu_ns(path: str) -> int:
    with open(f"{path}/schedstat") as f:
        return int(f.read().split()[0])


def _switches(path: str) -> int:
    n = 0
    with open(f"{path}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                n += int(line.split()[1])
    return n


def _sample(paths: dict[str, str]) -> dict[str, tuple[int, int]]:
    return {k: (_cpu_ns(p), _switches(p)) for k, p in paths.items()}


def _delta(a, b, n):
    return {k: ((b[k][0] - a[k][0]) / n / 1000, (b[k][1] - a[k][1]) / n) for k in a}


def _epoll_relay_proc(a: socket.socket, b: socket.socket) -> None:
    """The relay floor as a broker of many peers must wait: non-blocking sockets and
    ``epoll_wait`` instead of a blocking ``recv`` on the one socket it expects, and,
    like the monitor, a read of the peer it just sent to before going back to epoll."""
    for s in (a, b):
        s.setblocking(False)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(b.fileno(), select.EPOLLIN)
    other = {a.fileno(): b, b.fileno(): a}
    unpackb = msgpack.unpackb
    while True:
        for fd, _ev in ep.poll():
            src = other[other[fd].fileno()]
            while True:
                try:
                    d = src.recv(65536)
                except BlockingIOError:
                    break
                if not d:
                    return
                unpackb(d)
                dst = other[src.fileno()]
                dst.send(d)
                src = dst           # follow on: its answer may be there already


class EpollFloor:
    """The relay floor with :func:`_epoll_relay_proc` as its relay."""

    def __init__(self):
        cli, rel_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rel_s, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = cli
        self.pids = [bench._fork(bench._relay_server_proc, [srv.fileno()], srv),
                     bench._fork(_epoll_relay_proc, [rel_c.fileno(), rel_s.fileno()],
                                 rel_c, rel_s)]
        for s in (rel_c, rel_s, srv):
            s.close()

    def block(self, n: int) -> list[int]:
        return bench.relay_client(self.sock, n, "epoll floor")

    def stop(self) -> None:
        self.sock.close()
        bench._reap(self.pids, 5.0)


#: The measuring monitor's prelude: while forwarding is on (SIGUSR1; SIGUSR2 turns it
#: off) Core.message answers ``call`` (no region) and ``ret`` by
#: forwarding, as the real core's _dispatch and _finish_call word them, and passes every
#: other message to the real core.
_FORWARD_CORE = """
import signal
import tvmrt.monitor.core as mc
from tvmrt.monitor.effects import Send
real = mc.Core.message
waiting = {}
on = [False]
def message(self, peer_id, msg, nfds=0, now=0.0):
    if on[0]:
        op = msg.get("op")
        if op == "call" and not msg["a"][2]:
            p = self.peers[peer_id]
            s = self.pools[msg["handle"]].members[0]
            a = msg["a"]
            waiting[s.peer] = (peer_id, msg["rid"], a)
            return [Send(s.peer, {"op": "call", "a": [a[0], a[2], a[3]],
                                  "c": p.enclave.eid, "g": []}, ())]
        if op == "ret" and peer_id in waiting:
            caller, rid, a = waiting.pop(peer_id)
            a = a.copy()
            a[1] = msg["a"][1]
            a[4] = a[5] = 0
            return [Send(caller, {"op": "r", "rid": rid, "a": a, "g": []}, ())]
    return real(self, peer_id, msg, nfds, now)
def toggle(sig, _frame):
    on[0] = sig == signal.SIGUSR1
signal.signal(signal.SIGUSR1, toggle)
signal.signal(signal.SIGUSR2, toggle)
mc.Core.message = message
"""


class ForwardTvm(bench.Tvm):
    """:class:`tvmrt.bench.Tvm` on a monitor running :data:`_FORWARD_CORE`;
    :meth:`forward` turns forwarding on or off between blocks."""

    def start(self, prelude: str = _FORWARD_CORE) -> ForwardTvm:
        super().start(prelude)
        return self

    def forward(self, on: bool) -> None:
        assert self.host is not None and self.host.embedded is not None
        os.kill(self.host.embedded.pid, signal.SIGUSR1 if on else signal.SIGUSR2)
        time.sleep(0.05)            # handled at the monitor's next bytecode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", choices=("null", "loan_4k"), action="append",
                    help="tvmrt call shape(s) (default: null and loan_4k, same run)")
    ap.add_argument("--forward", action="store_true",
                    help="also the null call through a monitor whose core only forwards")
    ns = ap.parse_args(argv)
    n, warm = ns.calls, bench.WARMUP_SMALL
    configs = ns.config or ["null", "loan_4k"]
    floors = bench.Floors().start()
    efloor = EpollFloor()
    tvm = (ForwardTvm if ns.forward else bench.Tvm)(n + warm).start()
    try:
        ps = tvm.host.ps()
        mon = ps["monitor"]["pid"]
        srv = next(e["pid"] for e in ps["enclaves"] if e["name"] == bench.SERVER_NAME)
        fpaths = {"client": "/proc/thread-self", "relay": f"/proc/{floors.pids[1]}",
                  "server": f"/proc/{floors.pids[0]}"}
        tpaths = {"monitor": f"/proc/{mon}", "server": f"/proc/{srv}"}
        epaths = {"client": "/proc/thread-self", "relay": f"/proc/{efloor.pids[1]}",
                  "server": f"/proc/{efloor.pids[0]}"}
        runs = [(cfg, cfg) for cfg in configs] + ([("null", "forward")] if ns.forward else [])
        rows: dict[tuple[str, str], list] = {}
        walls: dict[str, list] = {"floor": [], "epoll": [], **{r[1]: [] for r in runs}}
        def floor(side, paths, block):
            block(warm)
            a = _sample(paths)
            samples = block(n)
            b = _sample(paths)
            walls[side] += samples
            for k, v in _delta(a, b, n).items():
                rows.setdefault((side, k), []).append(v)

        for _ in range(ns.rounds):
            floor("epoll", epaths, efloor.block)
            floor("floor", fpaths, floors.relay_block)
            for cfg, side in runs:
                if isinstance(tvm, ForwardTvm):
                    tvm.forward(side == "forward")
                a = _sample(tpaths)
                samples, _ = tvm.block(cfg, n + warm, warm)
                b = _sample(tpaths)
                walls[side] += samples[warm:]
                for k, v in _delta(a, b, n + warm).items():
                    rows.setdefault((side, k), []).append(v)
                rows.setdefault((side, "caller"), []).append(
                    (tvm.caller_cpu_ns / (n + warm) / 1000, float("nan")))
    finally:
        tvm.stop()
        efloor.stop()
        floors.stop()
    print(f"per-call budget, {n} calls x {ns.rounds} rounds, {bench.placement()}; "
          f"medians of the rounds")
    print(f"{'':8} {'process':9} {'CPU µs/call':>12} {'switches/call':>14}")
    total = dict.fromkeys(walls, 0.0)
    for (side, proc), vals in rows.items():
        cpu = statistics.median(v[0] for v in vals)
        sw = statistics.median(v[1] for v in vals)
        total[side] += cpu
        print(f"{side:8} {proc:9} {cpu:12.1f} {sw:14.2f}")
    fw = statistics.median(walls["floor"])
    for side in walls:
        wall = statistics.median(walls[side])
        print(f"{side:8} {'all':9} {total[side]:12.1f}   wall median {wall / 1000:.1f} µs; "
              f"× floor: CPU {total[side] / total['floor']:.2f}, wall {wall / fw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
