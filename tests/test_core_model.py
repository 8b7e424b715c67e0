"""Model-based test of the monitor's state machine (tvmrt.monitor.core), no processes.

A hypothesis ``RuleBasedStateMachine`` drives one Core, through :class:`core_driver.Driver`,
with a few hosts and enclaves: shared memory and schrodinger regions, create / run / exit /
destroy, mmap / unmap, calls (nested, queued, non-blocking, timed out, cyclic), returns
(good and bad), relay pages returned mid-run and reruns, region splits, asynchronous
calls, faults, deaths (EOF and the zygote's report, in either order), host
disconnects, failed segments and spawns, and garbage messages of random shapes.

Checked at every effect (by the driver): segments freed at most once and only when live,
sends only to peers the core has not closed, grants with an fd exactly when the peer does not
map the segment yet, every request answered exactly once.  Checked after every step
(:meth:`Driver.check`): every live relay region has one live owner -- the peer it was last
granted to -- or is in escrow for a queued call; live regions never overlap and lie in their
arenas; quotas add up; frames, queues and server registrations agree; no cycle of waiting
calls; enclaves wait exactly when the core holds their call, hosts exactly for the runs the
core has going.  At the end every host disconnects and every exit is reported: every segment
ever created has been freed and no enclave, region or peer remains.  The core never raises.

The arenas are made small (16 pages each) so that addresses are reused and exhausted.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from core_driver import Driver, snapshot
from tvmrt import errors as E
from tvmrt._layout import ARENAS, PAGE
from tvmrt.monitor import core as C
from tvmrt.monitor.config import Config
from tvmrt.monitor.effects import Kill

ARENA_PAGES = 16
NAMES = ["a", "b", "c"]
FIELDS = ["rid", "size", "id", "name", "type", "code", "path", "shm", "handle", "mem", "nonce",
          "vaddr", "a", "nb", "timeout", "v", "why", "c", "callers", "reason", "at", "arg"]
OPS = (sorted(C._HOST_OPS) + sorted(C._ENCLAVE_OPS) + sorted(C._ENCLAVE_NOTES)
       + ["r", "e", "grant", "start", "", "OP"])
NOTES = tuple(C._ENCLAVE_NOTES)
# a refused event changes nothing, except these refusals, which end something on purpose
CHANGING_ERRORS = {E.BadReturn.code, E.IsolationViolation.code}

# what msgpack can decode: nil, bool, ints of 64 bits, floats, str, bin, arrays, maps
scalars = (st.none() | st.booleans() | st.integers(-3, 70000)
           | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
           | st.binary(max_size=20))
values = st.recursive(
    scalars,
    lambda ch: st.lists(ch, max_size=7) | st.dictionaries(st.text(max_size=4), ch, max_size=3),
    max_leaves=10)
garbage = st.builds(
    lambda op, fields: {**fields, "op": op},
    st.sampled_from(OPS) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), values, max_size=6))


def small_core(isolation="mprotect"):
    return C.Core(Config(
        isolation=isolation,
        key=b"m" * 32, max_regions=6, max_bytes=10 * PAGE, max_region=4 * PAGE,
        queue_timeout=5.0, create_timeout=4.0, eof_grace=1.0, max_enclaves=5,
        max_enclaves_total=8, max_tombstones=3, max_calls_out=2, max_queue=2,
        arenas={name: (base, ARENA_PAGES * PAGE) for name, (base, _size) in ARENAS.items()}))


class CoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.d = Driver(small_core())
        self.rids = itertools.count(1 << 20)
        self.handles: set[int] = set()        # every handle ever returned (stale ones too)

    # ------------------------------------------------------------------ helpers
    @property
    def core(self):
        return self.d.core

    def hosts(self):
        return sorted(h for h in self.d.hosts if h in self.d.open)

    def enclaves(self, pred=None):
        """Enclave peers whose process runs and whose socket is open (they can send)."""
        out = []
        for p in sorted(self.d.enclaves):
            if p in self.d.procs and p in self.d.open:
                q = self.core.peers.get(p)
                e = q.enclave if q is not None else None
                if pred is None or (e is not None and q.alive and pred(e)):
                    out.append(p)
        return out

    def enc(self, peer):
        q = self.core.peers.get(peer)
        return q.enclave if q is not None else None

    @staticmethod
    def pick(data, items):
        items = sorted(set(items))
        return data.draw(st.sampled_from(items)) if items else None

    def prefer(self, data, good, rest):
        """Mostly one of ``good``; sometimes anything of ``rest``."""
        if good and data.draw(st.integers(0, 5)):
            return self.pick(data, good)
        return self.pick(data, list(good) + list(rest))

    def send(self, peer, msg):
        """Deliver ``msg``; a refused event (an error reply) must have changed nothing."""
        before = snapshot(self.core)
        tampered = len(self.d.tamper)
        self.d.message(peer, msg)
        rep = self.d.last_reply
        # (a resized segment found in a handoff kills its violator: not a mere refusal)
        if (rep is not None and rep.get("op") == "e" and rep.get("c") not in CHANGING_ERRORS
                and len(self.d.tamper) == tampered):
            after = snapshot(self.core)
            assert after == before, (
                f"refused {msg!r:.200} ({rep!r:.200}) changed the core: "
                + ", ".join(k for k in before if before[k] != after[k]))
        if rep is not None and rep.get("op") == "r" and "handle" in rep:
            self.handles.add(rep["handle"])
        for m in self.d.inbox.get(peer, ()):
            if m.get("op") == "r" and "handle" in m:
                self.handles.add(m["handle"])
        return rep

    def hsend(self, host, op, **kw):
        return self.send(host, {"op": op, "rid": next(self.rids), **kw})

    def esend(self, peer, op, **kw):
        msg = {"op": op, **kw}
        if op not in NOTES:
            msg["rid"] = next(self.rids)
        return self.send(peer, msg)

    def regions(self, pred=lambda r: True):
        return [r for r in self.core.regions.values() if pred(r)]

    # ------------------------------------------------------------------ a world to start from
    @initialize(data=st.data(), nhosts=st.integers(1, 2), servers=st.integers(1, 3),
                normals=st.integers(1, 4))
    def world(self, data, nhosts, servers, normals):
        """Hosts, registered servers and running normal enclaves (some with a schrodinger
        window, some with shared memory): random rules alone rarely get this far."""
        hosts = [self.d.connect() for _ in range(nhosts)]
        for name in NAMES[:servers]:
            n = data.draw(st.integers(1, 3))
            kw = {"instances": n} if n > 1 else {}
            # who may call it: its host process (the default), everyone, or by name
            callers = data.draw(st.sampled_from([None, "*", ["n"]]))
            if callers is not None:
                kw["callers"] = callers
            self.hsend(self.pick(data, hosts), "create", name=name, type=C.SERVER, code=b"s",
                       **kw)
        for _ in range(normals):
            self.create_and_run(data, self.pick(data, hosts), data.draw(st.integers(0, 2)))

    def create_and_run(self, data, h, memory):
        kw, runkw = {}, {}
        if memory == 1:
            rep = self.hsend(h, "sget", size=data.draw(st.integers(1, 2)) * PAGE)
            if rep is not None and rep["op"] == "r":
                runkw["mem"] = [rep["id"], 0, rep["size"]]
        elif memory == 2:
            rep = self.hsend(h, "shmget", size=PAGE)
            if rep is not None and rep["op"] == "r":
                kw["shm"] = [rep["id"], 0, PAGE]
        rep = self.hsend(h, "create", name="n", type=C.NORMAL, code=b"n", **kw)
        if rep is not None and rep["op"] == "r":
            if data.draw(st.integers(0, 3)) == 0:
                runkw["timeout"] = data.draw(st.sampled_from([0, 1, 3]))
            self.hsend(h, "run", handle=rep["handle"], **runkw)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), memory=st.integers(0, 2))
    def new_running_enclave(self, data, memory):
        self.create_and_run(data, self.pick(data, self.hosts()), memory)

    # ------------------------------------------------------------------ hosts
    @precondition(lambda self: len(self.hosts()) < 3)
    @rule()
    def connect(self):
        self.d.connect()

    @precondition(lambda self: self.hosts() and len(self.hosts()) < 4)
    @rule(data=st.data())
    def connect_again_from_the_same_process(self, data):
        """Another connection of an existing host process: it shares that process's
        quotas (the driver checks the accounts add up)."""
        h = self.pick(data, self.hosts())
        self.d.connect(pid=self.core.peers[h].pid)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data())
    def host_disconnects(self, data):
        self.d.disconnected(self.pick(data, self.hosts()))

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), pages=st.integers(0, 5), op=st.sampled_from(["shmget", "sget"]))
    def host_gets_memory(self, data, pages, op):
        self.hsend(self.pick(data, self.hosts()), op, size=pages * PAGE)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), op=st.sampled_from(["shmat", "shmdt", "shmctl", "sat", "sdt", "sctl"]))
    def host_region_op(self, data, op):
        h = self.pick(data, self.hosts())
        kind = "shm" if op.startswith("shm") else "relay"
        mine = [r.id for r in self.regions(lambda r: r.creator == h and r.kind == kind)]
        rid_ = self.prefer(data, mine, [r.id for r in self.regions()] + [C.FIRST_ID + 99])
        self.hsend(h, op, id=rid_)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), server=st.booleans(), name=st.sampled_from(NAMES),
          window=st.booleans(), fail=st.integers(0, 7), ready=st.integers(0, 2),
          timeout=st.sampled_from([None, None, 0, 2]), stdio=st.sampled_from([0, 0, 2, 1]),
          instances=st.sampled_from([1, 1, 2, 3]))
    def create(self, data, server, name, window, fail, ready, timeout, stdio, instances):
        h = self.pick(data, self.hosts())
        kw = self._window(data, h, "shm") if window else {}
        if timeout is not None:
            kw["timeout"] = timeout
        # 0: the zygote cannot start it; 1: the shell has no fds for its socket pair
        self.d.fail_next_spawn = {0: "fail", 1: "exhausted"}.get(fail, False)
        self.d.auto_ready = ready != 0
        if server and instances > 1:
            kw["instances"] = instances
        msg = {"op": "create", "rid": next(self.rids), "name": name,
               "type": C.SERVER if server else C.NORMAL, "code": name.encode(), **kw}
        before = snapshot(self.core)
        self.d.message(h, msg, nfds=stdio)
        rep = self.d.last_reply
        if rep is not None and rep["op"] == "e" and rep["c"] not in (
                E.EnclaveFault.code, E.ResourceExhausted.code):
            assert snapshot(self.core) == before, rep
        if fail == 1 and rep is not None and rep["op"] == "e" and \
                rep["c"] == E.ResourceExhausted.code:
            assert "cannot start" in rep["why"], rep
        if rep is not None and rep["op"] == "r":
            self.handles.add(rep["handle"])
            assert self.d.stdio[max(self.d.enclaves)] == ("message" if stdio == 2 else "null")
        self.d.fail_next_spawn = False
        self.d.auto_ready = True

    @precondition(lambda self: self.enclaves(lambda e: e.state == C.STARTING))
    @rule(data=st.data())
    def ready(self, data):
        p = self.pick(data, self.enclaves(lambda e: e.state == C.STARTING))
        self.esend(p, "ready")
        for m in self.d.inbox.get(self.enc(p).host if self.enc(p) else -1, ()):
            if m.get("op") == "r" and "handle" in m:
                self.handles.add(m["handle"])

    def _window(self, data, h, kind):
        """``{"shm"|"mem": [id, offset, size]}`` over one of host h's regions, or {}."""
        ids = [r.id for r in self.regions(lambda r: r.kind == kind and r.creator == h)]
        if not ids:
            return {}
        return {"shm" if kind == "shm" else "mem": [
            self.pick(data, ids), data.draw(st.integers(0, 2)) * PAGE,
            data.draw(st.integers(0, 2)) * PAGE]}

    def _own_handles(self, h, pred):
        return [e.handle for e in self.core.slots
                if e is not None and e.host == h and pred(e)]

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), window=st.booleans())
    def run(self, data, window):
        h = self.pick(data, self.hosts())
        good = self._own_handles(h, lambda e: e.type == C.NORMAL and e.state == C.CREATED)
        handle = self.prefer(data, good, list(self.handles) + [7])
        kw = self._window(data, h, "relay") if window else {}
        self.hsend(h, "run", handle=handle, **kw)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data())
    def destroy(self, data):
        h = self.pick(data, self.hosts())
        handle = self.prefer(data, self._own_handles(h, lambda e: e.state != C.DONE),
                             list(self.handles))
        if handle is not None:
            self.hsend(h, "destroy", handle=handle)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), op=st.sampled_from(["stop", "resume"]))
    def stop_or_resume(self, data, op):
        """stop / resume of an own enclave (any state: refusals change nothing), a
        server's pool handle, another host's or a stale handle."""
        h = self.pick(data, self.hosts())
        if op == "stop":
            good = self._own_handles(h, lambda e: e.state in C.STOPPABLE
                                     and e.stopped_by is None)
        else:
            good = self._own_handles(h, lambda e: e.stopped_by is e)
        handle = self.prefer(data, good, list(self.handles) + [7])
        if handle is not None:
            rep = self.hsend(h, op, handle=handle)
            if handle in good and rep is not None and rep.get("op") == "r":
                # on a pool handle other instances may refuse; a good single one never
                assert rep.get("stopped" if op == "stop" else "resumed"), rep

    # ------------------------------------------------------------------ enclaves
    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), pages=st.integers(0, 3))
    def mmap(self, data, pages):
        self.esend(self.pick(data, self.enclaves()), "mmap", size=pages * PAGE)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), wrong_size=st.integers(0, 5))
    def unmap(self, data, wrong_size):
        p = self.pick(data, self.enclaves())
        mine = [r.vaddr for r in self.regions(lambda r: r.owner == p)]
        vaddr = self.prefer(data, mine, [r.vaddr for r in self.regions()] + [ARENAS["mmap"][0]])
        r = self.core.by_vaddr.get(vaddr)
        size = r.length if r is not None and wrong_size else PAGE
        self.esend(p, "unmap", vaddr=vaddr, size=size)

    @precondition(lambda self: self.hosts() or self.enclaves())
    @rule(data=st.data(), op=st.sampled_from(["acquire", "report", "key", "attest", "ps"]),
          name=st.sampled_from(NAMES + ["zz", None]))
    def query(self, data, op, name):
        """Requests that change nothing: acquire, report, key (enclaves), attest, ps
        (hosts)."""
        if op in ("acquire", "report", "key"):
            if not self.enclaves():
                return
            p = self.pick(data, self.enclaves())
            kw = {} if name is None else {"name": name}
            if op == "report":
                self.esend(p, op, nonce=3, **kw)
            elif op == "key":
                self.esend(p, op, type=0 if name is None else 2, size=32)
            else:
                self.esend(p, op, name=name or "a")
        elif self.hosts():
            h = self.pick(data, self.hosts())
            self.hsend(h, op, handle=self.pick(data, list(self.handles) + [0]), nonce=5)

    def _call(self, data, callers, servers, nb, timeout, req_arg, with_region, size_ok):
        p = self.prefer(data, callers, self.enclaves())
        if p is None:
            return
        handle = self.prefer(data, servers(p), list(self.handles) + [12345])
        vaddr = size = 0
        if with_region:
            mine = [r.vaddr for r in self.regions(lambda r: r.owner == p)]
            if not mine and with_region == 1:
                # the usual pattern: map a request region, then call with it
                rep = self.esend(p, "mmap", size=data.draw(st.integers(1, 2)) * PAGE)
                if rep is not None and rep["op"] == "r":
                    mine = [rep["vaddr"]]
            if with_region == 3 or not mine:
                vaddr = self.pick(data, [r.vaddr for r in self.regions()]
                                  + [ARENAS["mmap"][0] + PAGE])
            else:
                vaddr = self.pick(data, mine)
            r = self.core.by_vaddr.get(vaddr)
            size = r.length if r is not None and size_ok else PAGE
        msg = {"handle": handle, "a": [req_arg, 0, vaddr, size, 0, 0], "nb": nb}
        if timeout is not None:
            msg["timeout"] = timeout
        self.esend(p, "call", **msg)

    CALL_ARGS = dict(data=st.data(), nb=st.integers(0, 3).map(lambda n: n == 0),
                     timeout=st.sampled_from([None, 0, 1, 3, 100]), req_arg=st.integers(0, 9),
                     with_region=st.integers(0, 3), size_ok=st.integers(0, 5))

    def _servers(self, p):
        return [pool.handle for pool in self.core.servers.values()]

    def _other_servers(self, p):
        return [pool.handle for pool in self.core.servers.values()
                if all(m.peer != p for m in pool.members)]

    @precondition(lambda self: self.enclaves())
    @rule(**CALL_ARGS)
    def call(self, **kw):
        """Any enclave calls (often a running one, often a registered server)."""
        self._call(callers=self.enclaves(lambda e: e.state in (C.RUNNING, C.SERVING)
                                         and len(e.out) < 2),
                   servers=self._servers, **kw)

    @precondition(lambda self: self.enclaves())
    @rule(**CALL_ARGS)
    def call_stopped_server(self, **kw):
        """A server pool is stopped by its host (when it can be), then called: the call
        queues (or nb: ServerBusy) until an instance is resumed or the deadline passes."""
        data = kw["data"]
        pools = sorted(self.core.servers.values(), key=lambda q: q.handle)
        if pools:
            pool = data.draw(st.sampled_from(pools))
            if self.d.hosts & self.d.open and pool.host in self.d.open:
                self.hsend(pool.host, "stop", handle=pool.handle)
        self._call(callers=self.enclaves(lambda e: e.state in (C.RUNNING, C.SERVING)
                                         and len(e.out) < 2),
                   servers=self._servers, **kw)

    @precondition(lambda self: self.enclaves())
    @rule(**CALL_ARGS)
    def call_from_normal(self, **kw):
        self._call(callers=self.enclaves(lambda e: e.state == C.RUNNING and len(e.out) < 2),
                   servers=self._servers, **kw)

    def _serve_a_loan(self, data):
        """Put an idle server inside a call with a region from a running enclave; returns
        the server's peer (or None)."""
        callers = self.enclaves(lambda e: e.state in (C.RUNNING, C.SERVING)
                                and len(e.out) < 2)
        idle = [m.peer for pool in self.core.servers.values() for m in pool.live()
                if m.state == C.IDLE]
        first = self.pick(data, callers)
        s = self.pick(data, [p for p in idle if p != first])
        if first is not None and s is not None:
            self._call(data=data, callers=[first], servers=lambda p: [self.enc(s).handle],
                       nb=False, timeout=None, req_arg=1, with_region=1, size_ok=1)
        return s

    @precondition(lambda self: self.enclaves())
    @rule(**CALL_ARGS)
    def nested_call(self, **kw):
        """A server inside a call (put there first, by a call with a region from a running
        enclave, if need be) calls another server, often passing its loan on."""
        data = kw["data"]
        serving = self.enclaves(lambda e: e.state == C.SERVING and len(e.out) < 2)
        if not serving and len(self.core.servers) >= 2:
            s = self._serve_a_loan(data)
            if s is not None:
                serving = [s] if self.enc(s).state == C.SERVING else []
        self._call(callers=serving, servers=self._other_servers, **kw)

    @precondition(lambda self: len(self.core.servers) >= 2)
    @rule(data=st.data(), timeout=st.sampled_from([None, 0, 1]))
    def lend_on(self, data, timeout):
        """A server lends a loan it holds on to another server (making a chain of lenders
        first, host -> enclave -> server, if need be): the chains along which a loan must
        come back to its nearest live lender when holders return, die or time out."""
        def holders():
            return [(r.owner, r.vaddr, r.length) for r in self.regions(
                lambda r: r.kind == "relay" and r.stack and r.owner in self.core.peers
                and self.enc(r.owner) is not None and self.enc(r.owner).state == C.SERVING
                and len(self.enc(r.owner).out) < 2)]
        if not holders():
            self._serve_a_loan(data)
        got = holders()
        if not got:
            return
        p, vaddr, length = self.pick(data, got)
        handle = self.pick(data, self._other_servers(p))
        if handle is None:
            return
        msg = {"handle": handle, "a": [1, 0, vaddr, length, 0, 0], "nb": False}
        if timeout is not None:
            msg["timeout"] = timeout
        self.esend(p, "call", **msg)

    @precondition(lambda self: self.enclaves())
    @rule(**CALL_ARGS)
    def call_busy_server(self, **kw):
        """Call a server that is inside a call (making it busy first, with a call from
        another enclave, if need be): the call queues, or is refused with nb."""
        data = kw["data"]
        callers = self.enclaves(lambda e: e.state in (C.RUNNING, C.SERVING)
                                and len(e.out) < 2)
        instances = self._instances()
        idle = [e for e in instances if e.state == C.IDLE]
        if len(callers) >= 2 and idle and not [e for e in instances if e.state == C.SERVING]:
            s = self.pick(data, [e.peer for e in idle])
            first = self.pick(data, [p for p in callers if p != s])
            if first is not None:
                self.esend(first, "call", handle=self.enc(s).pool.handle,
                           a=[9, 0, 0, 0, 0, 0])
                callers = [p for p in callers if p != first]
        self._call(callers=callers,
                   servers=lambda p: [e.pool.handle for e in self._instances()
                                      if e.state == C.SERVING and e.peer != p], **kw)

    def _instances(self):
        """Live instances of every registered server."""
        return [m for pool in self.core.servers.values() for m in pool.live()]

    def _ret(self, data, resp_val, with_resp):
        p = self.prefer(data, self.enclaves(
            lambda e: e.state == C.SERVING and not e.out), self.enclaves())
        vaddr = size = 0
        if with_resp:
            mine = [r.vaddr for r in self.regions(lambda r: r.owner == p)]
            vaddr = self.prefer(data, mine, [r.vaddr for r in self.regions()] + [PAGE])
            r = self.core.by_vaddr.get(vaddr)
            size = r.length if r is not None else PAGE
        self.esend(p, "ret", a=[0, resp_val, 0, 0, vaddr, size])

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), resp_val=st.integers(0, 9), with_resp=st.integers(0, 2))
    def ret(self, data, resp_val, with_resp):
        self._ret(data, resp_val, with_resp)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), resp_val=st.integers(0, 9))
    def ret_with_region(self, data, resp_val):
        self._ret(data, resp_val, 1)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), v=st.integers(0, 3))
    def exit(self, data, v):
        p = self.prefer(data, self.enclaves(
            lambda e: e.state == C.RUNNING and len(e.out) < 2), self.enclaves())
        self.esend(p, "exit", v=v)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), c=st.sampled_from([None, -17, -31, -25, -13, "x"]))
    def fault(self, data, c):
        p = self.prefer(data, self.enclaves(lambda e: e.state in (C.SERVING, C.STARTING)),
                        self.enclaves())
        kw = {} if c is None else {"c": c}
        self.esend(p, "fault", why="boom", **kw)

    # ------------------------------------------------------------------ relay pages, the rest
    def _paused(self, e):
        f = e.frame_in
        return f is not None and f.kind == "run" and f.paused is not None

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), right=st.integers(0, 4))
    def return_relay_page(self, data, right):
        """eapp_return_relay_page: mostly a running normal enclave naming its run's
        regions; sometimes anyone, or the wrong regions."""
        p = self.prefer(data, self.enclaves(
            lambda e: e.state == C.RUNNING and not e.out and not self._paused(e)),
            self.enclaves())
        e = self.enc(p)
        loans = e.frame_in.loans if e is not None and e.frame_in is not None else []
        v = [r.vaddr for r in loans] if right else [PAGE]
        self.esend(p, "rrp", v=v)

    @precondition(lambda self: self.hosts())
    @rule(data=st.data(), reason=st.sampled_from([1, 1, 1, 2, 0]), timeout=st.sampled_from(
        [None, None, 0, 1]), mem=st.booleans())
    def rerun(self, data, reason, timeout, mem):
        """The host continues an enclave that returned its relay page (or one that did
        not, or with a bad reason)."""
        h = self.pick(data, self.hosts())
        handle = self.prefer(data, self._own_handles(h, self._paused),
                             list(self.handles) + [7])
        kw = {} if timeout is None else {"timeout": timeout}
        if mem:
            ids = [r.id for r in self.regions(lambda r: r.kind == "relay" and r.creator == h)]
            if ids:
                kw["mem"] = self.pick(data, ids)
        self.hsend(h, "rerun", handle=handle, reason=reason, **kw)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), at=st.sampled_from([1, 1, 1, 2, 3, 0, -1, 4]),
          size_ok=st.integers(0, 5))
    def split(self, data, at, size_ok):
        """split_mem_region: mostly a region the enclave owns, split inside; sometimes at
        an edge, misaligned, a wrong size or someone else's region."""
        owners = {r.owner for r in self.regions(lambda r: r.kind == "relay"
                                                 and r.length > PAGE and not r.stack)}
        p = self.prefer(data, [q for q in self.enclaves() if q in owners], self.enclaves())
        if p is None:
            return
        mine = [r.vaddr for r in self.regions(lambda r: r.owner == p and r.kind == "relay")]
        if not mine:
            rep = self.esend(p, "mmap", size=2 * PAGE)
            if rep is not None and rep["op"] == "r":
                mine = [rep["vaddr"]]
        vaddr = self.prefer(data, mine, [r.vaddr for r in self.regions()]
                            + [ARENAS["mmap"][0]])
        r = self.core.by_vaddr.get(vaddr)
        size = r.length if r is not None and size_ok else PAGE
        split_at = vaddr + at * PAGE if at >= 0 else vaddr + 8
        self.esend(p, "split", vaddr=vaddr, size=size, at=split_at)

    @precondition(lambda self: self.enclaves())
    @rule(data=st.data(), with_region=st.integers(0, 3), size_ok=st.integers(0, 5),
          name=st.sampled_from(NAMES + ["zz"]))
    def asyn(self, data, with_region, size_ok, name):
        """asyn_enclave_call: an enclave gives a region (or none) to a server by name."""
        p = self.prefer(data, self.enclaves(lambda e: e.state in (C.RUNNING, C.SERVING)),
                        self.enclaves())
        vaddr = size = 0
        if with_region:
            mine = [r.vaddr for r in self.regions(lambda r: r.owner == p)]
            if not mine and with_region == 1:
                rep = self.esend(p, "mmap", size=PAGE)
                if rep is not None and rep["op"] == "r":
                    mine = [rep["vaddr"]]
            vaddr = self.prefer(data, mine, [r.vaddr for r in self.regions()] + [PAGE])
            r = self.core.by_vaddr.get(vaddr)
            size = r.length if r is not None and size_ok else PAGE
        self.esend(p, "asyn", name=name, arg=data.draw(st.integers(0, 9)), vaddr=vaddr,
                   size=size)

    @precondition(lambda self: self.d.live)
    @rule(data=st.data())
    def tamper(self, data):
        """A holder resizes a segment: the shell finds it at its next handoff."""
        self.d.tamper.add(self.pick(data, list(self.d.live)))

    # ------------------------------------------------------------------ deaths, time, shell
    def _mortal(self):
        return [p for p in self.d.enclaves if p in self.d.procs or p in self.d.open]

    @precondition(lambda self: self._mortal())
    @rule(data=st.data(), how=st.sampled_from(["both", "both, exit first", "eof", "exit"]))
    def die(self, data, how):
        """An enclave process dies: EOF and the zygote's report, in either order, or one of
        them now and the other in a later step."""
        p = self.pick(data, self._mortal())
        if how.startswith("both"):
            self.d.die(p, eof_first=how == "both")
        elif how == "eof" and p in self.d.open:
            self.d.disconnected(p)
        elif p in self.d.procs:
            self.d.exited(p, "exited 1")

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 10.0]))
    def tick(self, dt):
        self.d.tick(dt)

    @precondition(lambda self: self.core.timers)
    @rule(late=st.booleans())
    def deadline_passes(self, late):
        """Time runs to the next deadline (or just before it)."""
        self.d.tick(max(0.0, self.core.next_deadline() - self.d.now + (1e-6 if late else -0.25)))

    @rule(n=st.integers(0, 7))
    def next_segment_fails(self, n):
        self.d.fail_next_seg = n == 0

    @precondition(lambda self: self.hosts() or self.enclaves())
    @rule(data=st.data(), msg=garbage)
    def garbage(self, data, msg):
        self.send(self.pick(data, self.hosts() + self.enclaves()), msg)

    # ------------------------------------------------------------------ checks
    @invariant()
    def consistent(self):
        self.d.check()

    def teardown(self):
        self.d.fail_next_seg = False
        self.d.finish()


class ShutdownMachine(CoreMachine):
    """The same, ended by the monitor shutting down instead of the hosts leaving."""

    def teardown(self):
        self.d.fail_next_seg = False
        self.d.shutdown()
        assert not self.core.regions and not self.d.live
        assert set(self.d.created) == self.d.freed
        # the shell stops here (it drops every socket): every enclave must be finished
        assert not self.core.servers and not self.core.timers
        assert all(e is None or e.state == C.DONE for e in self.core.slots)
        assert not [p for p in self.core.peers.values() if p.alive]
        for p in sorted(self.d.enclaves):
            if p in self.d.procs and p in self.core.peers:
                assert any(type(e) is Kill and e.peer == p for e in self.d.effects)


class StrictMachine(CoreMachine):
    """The same in strict mode, with processes that keep a mapping of a segment they
    give up: the driver answers Verify effects from them; no segment is granted while a
    process that cheated on it lives, and the core's invariants hold throughout."""

    def __init__(self):
        super().__init__()
        self.d = Driver(small_core("strict"))

    @rule(data=st.data())
    def cheat(self, data):
        """A process keeps (or makes, from a dup of the fd) a mapping of a relay segment
        it has been given: it will still map it when it gives the region up."""
        pairs = [(p, s) for p, m in self.d.mapped.items() for s in m
                 if (p in self.d.procs or p in self.hosts())
                 and (r := self.core.seg_region.get(s)) is not None and r.kind == "relay"]
        if pairs:
            self.d.cheat.add(self.pick(data, pairs))

    def tamper(self, data):
        """Not a rule here.  Segments are memfds sealed against resizing
        (``F_SEAL_SHRINK | F_SEAL_GROW``, monitor/daemon.py ``_new_seg``), so the
        daemon no longer checks sizes at grants and never reports ``segment_tampered``
        (the core keeps the event for a shell that cannot seal).  ``segment_tampered``
        undoes a grant as a first one (``seg in send.segs``), which is the default
        mode's meaning of an fd; in strict mode every relay grant carries the fd, so
        its undo would need the Send's record (as :meth:`Core._unsend` has it from the
        Verify), which a plain Send does not carry.  The default-mode machine keeps
        the rule."""


# print_blob: a failure in CI prints the line that replays it (@reproduce_failure).
_settings = settings(max_examples=150, stateful_step_count=40, deadline=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Each run takes 5-30 s on the 2-core VM.  The timeout is far above that on purpose: a
# failure is shrunk before it is reported (hypothesis gives shrinking up to 5 minutes),
# and a timeout cut into a shrink shows only a FlakyStrategyDefinition, not the failure.
# At 120 s, a CI run's shrink was cut and the failure hidden; at 600 s the next one was
# reported whole, with the line that replays it: a real bug (a Signal to a peer cut off
# earlier in its batch; tests/test_daemon_shell.py).
_TIMEOUT = 600


@pytest.mark.timeout(_TIMEOUT)
def test_core_model():
    run_state_machine_as_test(CoreMachine, settings=_settings)


@pytest.mark.timeout(_TIMEOUT)
def test_core_model_strict():
    run_state_machine_as_test(StrictMachine, settings=settings(_settings, max_examples=300))


@pytest.mark.timeout(_TIMEOUT)
def test_core_model_shutdown():
    run_state_machine_as_test(ShutdownMachine, settings=settings(_settings, max_examples=60))


@pytest.mark.stress
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("machine", [CoreMachine, StrictMachine, ShutdownMachine],
                         ids=["default", "strict", "shutdown"])
def test_core_model_long(machine):
    """The same machines with 5,000 examples each (``pytest -m stress``)."""
    run_state_machine_as_test(machine, settings=settings(_settings, max_examples=5000))
