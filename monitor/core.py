"""The monitor's logic as a pure state machine ("sans-IO").

The :class:`Core` holds every fact the monitor knows -- peers, enclaves, the
server registry, regions and their owners, loans, call frames, queues -- and
changes it only in response to events.  Each event method returns a list of
*effects* (tuples) that the I/O shell (:mod:`tvmrt.monitor.daemon`) performs.
No sockets, no syscalls, no clock, no randomness happen here: time comes in as
an argument, the attestation key is given at construction.  That is what lets
the tests drive it exhaustively.

Events (methods):
    host_connected(uid, pid) -> (peer, effects)
    message(peer, msg, nfds, now) -> effects        a decoded frame from a peer
    disconnected(peer) -> effects                   EOF / bad frame on a peer's socket
    spawned(peer, pid) / spawn_failed(peer, why)    zygote reports
    exited(peer, how) -> effects                    zygote reaped an enclave
    segment_failed(seg, why, rid, rest) -> effects  the shell could not create a segment
    tick(now) -> effects                            a deadline may have passed
    shutdown() -> effects                           destroy everything

Effects:
    ("send", peer, msg, segs)      send msg to peer, with the fds of segments ``segs``
    ("spawn", peer, spec, shm_seg) start an enclave process (stdio = fds of the message
                                   being handled), socket bound to ``peer``
    ("kill", peer)                 make sure the enclave process of ``peer`` is dead
    ("close", peer)                close the peer's socket
    ("new_seg", seg, size)         create a shared-memory segment
    ("free_seg", seg)              close the monitor's fd of a segment
    ("log", text)                  a line for the monitor's log

Ownership rules (DESIGN.md §2-§4):
    * a relay region has exactly one owner (a peer) or is in escrow (owner None)
      while a queued call waits; ``stack`` lists the lenders it must return to;
    * loans always return to the nearest live lender at the same address;
    * a region nobody can own any more is freed.
"""
from __future__ import annotations

import hashlib
import hmac
from collections import deque

from tvmrt import errors as E
from tvmrt._layout import ARENAS, PAGE

from .validate import (U64, Invalid, check_u64, get_bytes, get_int, get_name,
                       get_opt_window, get_str, get_u64)

NORMAL = 0
SERVER = 1

HOST = "host"
ENCLAVE = "enclave"

# enclave states
CREATED = "created"      # normal enclave spawned, waiting for run
RUNNING = "running"      # normal enclave in its run
IDLE = "idle"            # server waiting for calls
SERVING = "serving"      # server inside a call
DONE = "done"            # finished or dead, waiting for the process to be reaped

FIRST_ID = 0x10000       # host-visible shm / schrodinger ids start here, as in Penglai
MAX_CODE = 1024 * 1024


class Limits:
    """Per-peer quotas and sizes (bytes)."""

    def __init__(self, max_regions=1024, max_bytes=8 << 30, max_region=4 << 30,
                 queue_timeout=60.0, max_enclaves=256):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.max_region = max_region
        self.queue_timeout = queue_timeout
        self.max_enclaves = max_enclaves


class Peer:
    __slots__ = ("id", "kind", "uid", "pid", "alive", "segs", "drops", "regions", "bytes",
                 "enclave", "enclaves", "eof", "how")

    def __init__(self, pid_, kind):
        self.id = pid_
        self.kind = kind
        self.uid = None
        self.pid = None
        self.alive = True
        self.segs = set()        # segments this peer's process has mapped (fd already sent)
        self.drops = []          # segments it must unmap, piggybacked on the next message
        self.regions = 0         # quota accounting (regions created by this peer)
        self.bytes = 0
        self.enclave = None      # Enclave, for enclave peers
        self.enclaves = set()    # enclave peers created by this host
        self.eof = False         # enclave socket reached EOF
        self.how = None          # exit description from the zygote


class Enclave:
    __slots__ = ("peer", "eid", "gen", "name", "type", "host", "state", "frame_in",
                 "frame_out", "measurement", "shm", "queue", "pid", "why")

    def __init__(self, peer, eid, gen, name, etype, host, measurement):
        self.peer = peer
        self.eid = eid
        self.gen = gen
        self.name = name
        self.type = etype
        self.host = host
        self.state = CREATED if etype == NORMAL else IDLE
        self.frame_in = None     # the call (or run) this enclave is serving
        self.frame_out = None    # the call this enclave is waiting for
        self.measurement = measurement
        self.shm = None
        self.queue = deque()     # frames waiting for this server
        self.pid = None
        self.why = None

    @property
    def handle(self):
        return (self.gen << 32) | self.eid


class Region:
    __slots__ = ("id", "seg", "vaddr", "length", "kind", "arena", "creator", "owner",
                 "stack", "mappers", "revoked")

    def __init__(self, rid, seg, vaddr, length, kind, arena, creator):
        self.id = rid
        self.seg = seg
        self.vaddr = vaddr
        self.length = length
        self.kind = kind          # "shm" or "relay"
        self.arena = arena        # the arena its address came from
        self.creator = creator
        self.owner = creator if kind == "relay" else None
        self.stack = []           # lenders, innermost last
        self.mappers = set()      # peers whose process maps the segment
        self.revoked = False      # shm id revoked by shmctl


class Frame:
    """One run (host -> normal enclave) or call (enclave -> server)."""
    __slots__ = ("kind", "caller", "server", "loans", "arg", "rid", "deadline", "queued")

    def __init__(self, kind, caller, server, loans, arg, rid=None, deadline=None):
        self.kind = kind          # "run" or "call"
        self.caller = caller      # peer id
        self.server = server      # Enclave
        self.loans = loans        # [Region]
        self.arg = arg            # list of 6 ints (call) / [a10..a14] (run)
        self.rid = rid            # host request id (run)
        self.deadline = deadline
        self.queued = False


class VaAllocator:
    """First-fit allocator of page-aligned address ranges inside one arena."""

    def __init__(self, base, size):
        self.base, self.size = base, size
        self.free = [(base, size)]          # sorted, coalesced

    def alloc(self, length):
        for i, (start, n) in enumerate(self.free):
            if n >= length:
                if n == length:
                    del self.free[i]
                else:
                    self.free[i] = (start + length, n - length)
                return start
        return None

    def release(self, start, length):
        free = self.free
        i = 0
        while i < len(free) and free[i][0] < start:
            i += 1
        free.insert(i, (start, length))
        # coalesce with neighbours
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i] = (free[i][0], free[i][1] + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]


def _err(exc, rid=None):
    msg = {"op": "e", "c": exc.code, "why": exc.reason}
    if rid is not None:
        msg["rid"] = rid
    return msg


def measure(etype: int, name: str, code: bytes) -> bytes:
    """Measurement of an eapp: SHA-256 over type, name and the exact code bytes."""
    h = hashlib.sha256(b"tvmrt-eapp-v1\0")
    h.update(bytes([etype]))
    h.update(name.encode() + b"\0")
    h.update(code)
    return h.digest()


class Core:
    """The monitor state machine.  See the module docstring for events and effects."""

    def __init__(self, key: bytes = b"\0" * 32, limits: Limits | None = None):
        self.key = key
        self.limits = limits or Limits()
        self.peers: dict[int, Peer] = {}
        self.slots: list = []                 # eid -> Enclave or None
        self.gens: list = []                  # eid -> generation of the next occupant
        self.servers: dict[str, Enclave] = {}
        self.regions: dict[int, Region] = {}  # host-visible id -> Region
        self.by_vaddr: dict[int, Region] = {}
        self.arenas = {k: VaAllocator(b, s) for k, (b, s) in ARENAS.items()}
        self._next_peer = 1
        self._next_id = FIRST_ID
        self._next_seg = 1
        self.seg_region: dict[int, Region] = {}
        self.queued: list[Frame] = []         # frames waiting in some queue (for deadlines)

    # ------------------------------------------------------------------ helpers
    def _new_peer(self, kind):
        p = Peer(self._next_peer, kind)
        self._next_peer += 1
        self.peers[p.id] = p
        return p

    def _send(self, fx, peer_id, msg, segs=()):
        """Queue a send, piggybacking pending unmaps for that peer."""
        p = self.peers.get(peer_id)
        if p is None or not p.alive:
            return
        if p.drops:
            msg["d"] = p.drops
            p.drops = []
        fx.append(("send", peer_id, msg, list(segs)))

    def _grants(self, peer_id, regions):
        """Grant list for ``regions`` to ``peer_id`` and the segments whose fds must go."""
        if not regions:
            return [], []
        p = self.peers[peer_id]
        g, segs = [], []
        for r in regions:
            need = r.seg not in p.segs
            g.append([r.seg, r.vaddr, r.length, 1 if need else 0])
            if need:
                segs.append(r.seg)
                p.segs.add(r.seg)
                r.mappers.add(peer_id)
        return g, segs

    def _alive(self, peer_id):
        p = self.peers.get(peer_id)
        return p is not None and p.alive

    def _new_region(self, fx, creator: Peer, size, kind, arena):
        lim = self.limits
        if size <= 0 or size > lim.max_region:
            raise E.BadSize(f"size {size:#x} out of range (1 .. {lim.max_region:#x})")
        if size % PAGE:
            raise E.BadSize(f"size {size:#x} is not a page multiple")
        if creator.regions + 1 > lim.max_regions or creator.bytes + size > lim.max_bytes:
            raise E.QuotaExceeded(
                f"quota: {creator.regions} regions, {creator.bytes} bytes in use")
        vaddr = self.arenas[arena].alloc(size)
        if vaddr is None:
            raise E.NoMemory(f"no room for {size:#x} bytes in the {arena} arena")
        r = Region(self._next_id, self._next_seg, vaddr, size, kind, arena, creator.id)
        self._next_id += 1
        self._next_seg += 1
        self.regions[r.id] = r
        self.by_vaddr[vaddr] = r
        self.seg_region[r.seg] = r
        creator.regions += 1
        creator.bytes += size
        fx.append(("new_seg", r.seg, size, arena))
        return r

    def _free_region(self, fx, r: Region):
        if self.regions.pop(r.id, None) is None:
            return
        self.by_vaddr.pop(r.vaddr, None)
        self.seg_region.pop(r.seg, None)
        self.arenas[r.arena].release(r.vaddr, r.length)
        c = self.peers.get(r.creator)
        if c is not None:
            c.regions -= 1
            c.bytes -= r.length
        for m in r.mappers:
            p = self.peers.get(m)
            if p is not None and p.alive:
                p.segs.discard(r.seg)
                p.drops.append(r.seg)
        if not r.revoked:
            fx.append(("free_seg", r.seg))
        r.owner = None
        r.stack = []

    def _return_to_lender(self, fx, r: Region):
        """Give a loaned region back to the nearest live lender; free it if none is left."""
        while r.stack:
            lender = r.stack.pop()
            if self._alive(lender):
                r.owner = lender
                return lender
        self._free_region(fx, r)
        return None

    def _enclave(self, handle):
        if not isinstance(handle, int) or handle < 0:
            raise E.UnknownHandle(f"bad handle {handle!r}")
        eid, gen = handle & 0xFFFFFFFF, handle >> 32
        if eid >= len(self.slots):
            raise E.UnknownHandle(f"no enclave {handle:#x}")
        e = self.slots[eid]
        if e is None or e.gen != gen or e.state == DONE:
            raise E.UnknownHandle(f"no live enclave {handle:#x}")
        return e

    def _host_region(self, peer, rid_, kind):
        r = self.regions.get(rid_)
        if r is None or r.kind != kind or r.revoked:
            raise E.UnknownId(f"no {kind} region with id {rid_!r}")
        if r.creator != peer.id:
            raise E.NotPermitted(f"region {rid_:#x} belongs to another host")
        return r

    # ------------------------------------------------------------------ events
    def host_connected(self, uid, pid):
        p = self._new_peer(HOST)
        p.uid, p.pid = uid, pid
        return p.id, [("log", f"host {p.id} connected (pid {pid}, uid {uid})")]

    def message(self, peer_id, msg, nfds=0, now=0.0):
        """Handle one decoded frame from ``peer_id``."""
        p = self.peers.get(peer_id)
        if p is None or not p.alive:
            return []
        fx: list = []
        op = msg.get("op")
        if p.kind == HOST:
            handler = _HOST_OPS.get(op)
            rid = msg.get("rid")
            if not isinstance(rid, int):
                rid = None
            if handler is None:
                self._send(fx, peer_id, _err(E.ProtocolError(f"unknown op {op!r}"), rid))
                return fx
            try:
                handler(self, fx, p, msg, rid, nfds, now)
            except Invalid as exc:
                self._send(fx, peer_id, _err(E.InvalidArgument(str(exc)), rid))
            except E.TvmError as exc:
                self._send(fx, peer_id, _err(exc, rid))
            return fx
        handler = _ENCLAVE_OPS.get(op)
        if handler is None:
            self._send(fx, peer_id, _err(E.ProtocolError(f"unknown op {op!r}")))
            return fx
        try:
            handler(self, fx, p, p.enclave, msg, now)
        except Invalid as exc:
            self._send(fx, peer_id, _err(E.InvalidArgument(str(exc))))
        except E.TvmError as exc:
            self._send(fx, peer_id, _err(exc))
        return fx

    def disconnected(self, peer_id):
        """The peer's socket closed (or sent garbage and was cut off)."""
        p = self.peers.get(peer_id)
        if p is None:
            return []
        fx: list = []
        if p.kind == HOST:
            if p.alive:
                self._host_gone(fx, p)
            return fx
        p.eof = True
        if p.enclave.state != DONE:
            fx.append(("kill", peer_id))    # the exit status (next event) gives the reason
        self._maybe_reap(fx, p)
        return fx

    def spawned(self, peer_id, pid):
        p = self.peers.get(peer_id)
        if p is not None and p.enclave is not None:
            p.enclave.pid = pid
        return []

    def spawn_failed(self, peer_id, why):
        p = self.peers.get(peer_id)
        if p is None or p.enclave is None:
            return []
        p.how = f"could not start: {why}"
        p.eof = True
        fx: list = []
        self._maybe_reap(fx, p)
        return fx

    def exited(self, peer_id, how):
        """The zygote reaped the enclave process of ``peer_id``; ``how`` describes it."""
        p = self.peers.get(peer_id)
        if p is None or p.enclave is None:
            return []
        p.how = how
        fx: list = []
        if not p.eof:
            # The process is dead, so EOF on its socket follows the last message it sent;
            # wait for it so that an EXIT still in the socket is not mistaken for a crash.
            return fx
        self._maybe_reap(fx, p)
        return fx

    def segment_failed(self, seg, why, rid, rest):
        """The shell could not create segment ``seg``; ``rest`` are the effects of the same
        batch it has not performed yet.

        Returns the effects to perform instead: the success reply queued for the region's
        creator is replaced by a NoMemory error that still carries the unmaps that rode on
        the reply, and the region is undone.
        """
        r = self.seg_region.get(seg)
        if r is None:
            return rest
        creator = r.creator
        kept, drops = [], []
        for e in rest:
            if e[0] == "send" and e[1] == creator and e[2].get("op") == "r":
                drops.extend(e[2].get("d", ()))
            else:
                kept.append(e)
        r.revoked = True          # no fd exists, so no free_seg
        r.mappers.clear()
        c = self.peers.get(creator)
        if c is not None:
            c.segs.discard(seg)
            c.drops = drops + c.drops
        fx: list = []
        self._free_region(fx, r)
        self._send(fx, creator, _err(E.NoMemory(why), rid))
        return kept + fx

    def tick(self, now):
        """Expire queued calls whose deadline passed."""
        fx: list = []
        for f in list(self.queued):
            if f.deadline is not None and f.deadline <= now and f.queued:
                self._unqueue(f)
                # Fix: also leave the server's queue.  A timed-out frame left there was
                # dispatched later (its loans granted to the server although the caller had
                # them back) and kept an idle server looking busy.
                f.server.queue.remove(f)
                self._fail_call(fx, f, E.Timeout(
                    f"server {f.server.name!r} stayed busy past the deadline"))
        return fx

    def next_deadline(self):
        ds = [f.deadline for f in self.queued if f.deadline is not None]
        return min(ds) if ds else None

    def shutdown(self):
        """Destroy every enclave and free every region (the monitor is stopping)."""
        fx: list = []
        for p in list(self.peers.values()):
            if p.kind == HOST and p.alive:
                self._host_gone(fx, p)
        for p in list(self.peers.values()):
            if p.kind == ENCLAVE and p.enclave.state != DONE:
                self._destroy(fx, p.enclave, "the monitor is shutting down")
        for r in list(self.regions.values()):
            self._free_region(fx, r)
        return fx

    # ------------------------------------------------------------------ lifecycle
    def _host_gone(self, fx, p: Peer):
        p.alive = False
        for ep in list(p.enclaves):
            e = self.peers[ep].enclave
            if e.state != DONE:
                self._destroy(fx, e, "its host disconnected")
        for r in list(self.regions.values()):
            r.mappers.discard(p.id)
            if r.creator == p.id and (r.kind == "shm" or r.owner == p.id):
                self._free_region(fx, r)
        fx.append(("close", p.id))
        fx.append(("log", f"host {p.id} disconnected"))
        self.peers.pop(p.id, None)

    def _destroy(self, fx, e: Enclave, why):
        """Kill enclave ``e`` now and settle everything it was part of."""
        e.why = e.why or why
        self._settle(fx, e)
        p = self.peers[e.peer]
        p.eof = True              # we close its socket: no EOF event will come
        fx.append(("kill", e.peer))
        fx.append(("close", e.peer))
        self._maybe_reap(fx, p)

    def _maybe_reap(self, fx, p: Peer):
        """Finalize an enclave once its socket hit EOF *and* its process was reaped."""
        if not (p.eof and p.how is not None):
            return
        e = p.enclave
        if e.state != DONE:
            e.why = e.why or p.how
            self._settle(fx, e)
        fx.append(("close", p.id))
        if e.eid < len(self.slots) and self.slots[e.eid] is e:
            self.slots[e.eid] = None
            self.gens[e.eid] = e.gen + 1
        host = self.peers.get(e.host)
        if host is not None:
            host.enclaves.discard(p.id)
        self.peers.pop(p.id, None)

    def _settle(self, fx, e: Enclave):
        """Enclave ``e`` is finished or dead: unwind every frame and region it touches."""
        if e.state == DONE:
            return
        p = self.peers[e.peer]
        p.alive = False
        e.state = DONE
        why = e.why or "died"
        if e.type == SERVER and self.servers.get(e.name) is e:
            del self.servers[e.name]
        # calls queued on this server never reached it: refuse them
        while e.queue:
            f = e.queue.popleft()
            self._unqueue(f)
            self._fail_call(fx, f, E.PeerDied(f"server {e.name!r} {why}"))
        # a call it waits for: a queued one is withdrawn; a running one finishes, and its
        # loans then skip this dead caller on their way back
        f = e.frame_out
        if f is not None:
            e.frame_out = None
            if f.queued:
                self._unqueue(f)
                f.server.queue.remove(f)
                for r in f.loans:
                    r.stack.pop()
                    r.owner = e.peer
        # the call or run it is serving fails; what it holds on loan goes back
        f = e.frame_in
        if f is not None:
            e.frame_in = None
            if f.kind == "run":
                self._finish_run(fx, f, None, E.EnclaveFault(f"enclave {e.name!r}: {why}"))
            else:
                self._finish_call(fx, f, None, None, E.PeerDied(f"server {e.name!r} {why}"))
        # anything else it owns: loans go back, its own regions are freed
        for r in list(self.regions.values()):
            self._unmapped(fx, r, e.peer)
            if r.kind == "relay" and r.owner == e.peer:
                if r.stack:
                    self._give_back(fx, [r], e.peer, None)
                else:
                    self._free_region(fx, r)
        fx.append(("log", f"enclave {e.name!r} (eid {e.eid}) finished: {why}"))

    def _unmapped(self, fx, r: Region, peer_id):
        """``peer_id`` no longer maps region ``r``; a revoked shm region may now go."""
        r.mappers.discard(peer_id)
        if r.revoked and not r.mappers:
            self._free_region(fx, r)

    def _give_back(self, fx, loans, holder, expected):
        """Return ``loans`` held by ``holder`` to their lenders.

        Regions going to ``expected`` are returned in a list (the caller puts their grants
        in its reply); regions going to anyone else get an unsolicited ``grant`` message.
        """
        if not loans:
            return []
        back, other = [], {}
        for r in loans:
            if r.id not in self.regions or r.owner != holder:
                continue
            lender = self._return_to_lender(fx, r)
            if lender is None:
                continue
            if lender == expected:
                back.append(r)
            else:
                other.setdefault(lender, []).append(r)
        for peer_id, rs in other.items():
            g, segs = self._grants(peer_id, rs)
            self._send(fx, peer_id, {"op": "grant", "g": g}, segs)
        return back

    # ------------------------------------------------------------------ calls
    def _unqueue(self, f):
        f.queued = False
        try:
            self.queued.remove(f)
        except ValueError:
            pass

    def _dispatch(self, fx, f: Frame):
        """Start call ``f`` on its (idle) server."""
        s = f.server
        s.state = SERVING
        s.frame_in = f
        for r in f.loans:
            r.owner = s.peer
        g, segs = self._grants(s.peer, f.loans)
        a = f.arg
        caller = self.peers[f.caller].enclave
        self._send(fx, s.peer, {"op": "call", "a": [a[0], a[2], a[3]], "c": caller.eid,
                                "g": g}, segs)

    def _next_call(self, fx, s: Enclave):
        while s.queue and s.state == IDLE:
            f = s.queue.popleft()
            self._unqueue(f)
            if not self._alive(f.caller):
                for r in f.loans:
                    self._return_to_lender(fx, r)
                continue
            self._dispatch(fx, f)

    def _fail_call(self, fx, f: Frame, exc):
        """A queued call that never reached its server: give the loans back, report."""
        back = self._give_back(fx, f.loans, None, f.caller)
        c = self.peers.get(f.caller)
        if c is not None and c.alive:
            c.enclave.frame_out = None
            g, segs = self._grants(f.caller, back)
            msg = _err(exc)
            msg["g"] = g
            self._send(fx, f.caller, msg, segs)

    def _finish_call(self, fx, f: Frame, resp: Region | None, resp_val, exc=None):
        """Return loans (and the response region) of call ``f`` and answer its caller."""
        back = self._give_back(fx, f.loans, f.server.peer, f.caller)
        c = self.peers.get(f.caller)
        caller_alive = c is not None and c.alive
        if resp is not None and resp not in f.loans:
            if caller_alive:
                resp.owner = f.caller
                back.append(resp)
            else:
                self._free_region(fx, resp)
        if not caller_alive:
            return
        c.enclave.frame_out = None
        g, segs = self._grants(f.caller, back)
        if exc is not None:
            msg = _err(exc)
            msg["g"] = g
        else:
            a = list(f.arg)
            a[1] = resp_val
            if resp is not None:
                a[4], a[5] = resp.vaddr, resp.length
            else:
                a[4], a[5] = 0, 0
            msg = {"op": "r", "a": a, "g": g}
        self._send(fx, f.caller, msg, segs)

    def _finish_run(self, fx, f: Frame, retval, exc=None):
        """The run ``f`` ended: schrodinger regions go back to the host, which is answered."""
        back = self._give_back(fx, f.loans, f.server.peer, f.caller)
        h = self.peers.get(f.caller)
        if h is None or not h.alive:
            return
        g, segs = self._grants(f.caller, back)
        if exc is not None:
            msg = _err(exc, f.rid)
            msg["g"] = g
        else:
            msg = {"op": "r", "rid": f.rid, "retval": retval, "g": g}
        self._send(fx, f.caller, msg, segs)

    def report(self, e: Enclave, nonce: int) -> dict:
        """Attestation report: hash = SHA-256(measurement || nonce), sig = HMAC-SHA-512."""
        h = hashlib.sha256(e.measurement + nonce.to_bytes(8, "little")).digest()
        sig = hmac.new(self.key, h, hashlib.sha512).digest()
        return {"hash": h, "sig": sig, "nonce": nonce, "measurement": e.measurement,
                "name": e.name, "type": e.type}


# ---------------------------------------------------------------------- host ops
def _h_shmget(core, fx, p, msg, rid, nfds, now):
    size = get_u64(msg, "size")
    r = core._new_region(fx, p, size, "shm", "shm")
    core._send(fx, p.id, {"op": "r", "rid": rid, "id": r.id, "vaddr": r.vaddr,
                          "size": r.length})


def _h_sget(core, fx, p, msg, rid, nfds, now):
    size = get_u64(msg, "size")
    r = core._new_region(fx, p, size, "relay", "relay")
    core._send(fx, p.id, {"op": "r", "rid": rid, "id": r.id, "vaddr": r.vaddr,
                          "size": r.length})


def _h_attach(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmat" else "relay"
    r = core._host_region(p, get_int(msg, "id"), kind)
    if kind == "relay" and r.owner != p.id:
        raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
    g, segs = core._grants(p.id, [r])
    if not segs:
        raise E.BadState(f"region {r.id:#x} is already attached")
    core._send(fx, p.id, {"op": "r", "rid": rid, "vaddr": r.vaddr, "size": r.length, "g": g},
               segs)


def _h_detach(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmdt" else "relay"
    r = core._host_region(p, get_int(msg, "id"), kind)
    if r.seg not in p.segs:
        raise E.BadState(f"region {r.id:#x} is not attached")
    p.segs.discard(r.seg)
    r.mappers.discard(p.id)
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _h_ctl(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmctl" else "relay"
    r = core._host_region(p, get_int(msg, "id"), kind)
    if kind == "relay":
        if r.owner != p.id:
            raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
        if r.seg in p.segs:
            raise E.BadState(f"schrodinger region {r.id:#x} is still attached: dt first")
        core._free_region(fx, r)
    else:
        # Revoke the id and close the monitor's fd.  Enclaves that map the memory keep
        # it (the kernel frees it with the last mapping: no use-after-free, unlike
        # Penglai); its address range stays taken until they are gone.
        if r.seg in p.segs:
            raise E.BadState(f"shared memory {r.id:#x} is still attached: shmdt first")
        fx.append(("free_seg", r.seg))
        r.revoked = True
        if not r.mappers:
            core._free_region(fx, r)
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _h_create(core, fx, p, msg, rid, nfds, now):
    name = get_name(msg, "name")
    etype = get_int(msg, "type")
    if etype not in (NORMAL, SERVER):
        raise E.InvalidArgument(f"enclave type must be 0 (normal) or 1 (server), not {etype}")
    code = get_bytes(msg, "code", MAX_CODE)
    path = get_str(msg, "path", 4096, default="<eapp>")
    window = get_opt_window(msg, "shm")
    if etype == SERVER and name in core.servers:
        raise E.NameInUse(f"a server named {name!r} exists")
    if sum(1 for e in core.slots if e is not None) >= core.limits.max_enclaves:
        raise E.QuotaExceeded("too many enclaves")
    shm = None
    if window is not None:
        sid, off, size = window
        r = core._host_region(p, sid, "shm")
        if off % PAGE or size % PAGE:
            raise E.Unaligned("shm offset and size must be page multiples")
        if size == 0 or off + size > r.length:
            raise E.BadSize(f"shm window {off:#x}+{size:#x} outside region of {r.length:#x}")
        shm = (r, off, size)
    # lowest free slot, as Penglai's monitor does
    try:
        eid = core.slots.index(None)
    except ValueError:
        eid = len(core.slots)
        core.slots.append(None)
        core.gens.append(0)
    ep = core._new_peer(ENCLAVE)
    e = Enclave(ep.id, eid, core.gens[eid], name, etype, p.id, measure(etype, name, code))
    ep.enclave = e
    core.slots[eid] = e
    p.enclaves.add(ep.id)
    if etype == SERVER:
        core.servers[name] = e
    spec = {"eid": eid, "handle": e.handle, "name": name, "type": etype, "code": code,
            "path": path}
    seg = None
    if shm is not None:
        r, off, size = shm
        spec["shm"] = [r.vaddr + off, size, off]
        e.shm = (r.vaddr + off, size)
        seg = r.seg
        r.mappers.add(ep.id)
        ep.segs.add(r.seg)
    fx.append(("spawn", ep.id, spec, seg))
    core._send(fx, p.id, {"op": "r", "rid": rid, "eid": eid, "handle": e.handle,
                          "measurement": e.measurement})


def _own_enclave(core, p, msg):
    e = core._enclave(get_int(msg, "handle"))
    if e.host != p.id:
        raise E.NotPermitted(f"enclave {e.name!r} belongs to another host")
    return e


def _h_run(core, fx, p, msg, rid, nfds, now):
    e = _own_enclave(core, p, msg)
    if e.type != NORMAL:
        raise E.BadState("a server enclave is entered by call_enclave, not run")
    if e.state != CREATED:
        raise E.BadState(f"enclave {e.name!r} is {e.state}, not ready to run")
    window = get_opt_window(msg, "mem")
    loans = []
    a13 = a14 = 0
    if window is not None:
        sid, off, size = window
        r = core._host_region(p, sid, "relay")
        if r.owner != p.id:
            raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
        if off % PAGE or size % PAGE:
            raise E.Unaligned("schrodinger offset and size must be page multiples")
        if size == 0 or off + size > r.length:
            raise E.BadSize(f"window {off:#x}+{size:#x} outside region of {r.length:#x}")
        loans.append(r)
        a13, a14 = r.vaddr + off, size
    a10, a11 = e.shm if e.shm else (0, 0)
    f = Frame("run", p.id, e, loans, [a10, a11, 0, a13, a14], rid=rid)
    for r in loans:
        r.stack.append(p.id)
        r.owner = e.peer
    e.state = RUNNING
    e.frame_in = f
    g, segs = core._grants(e.peer, loans)
    core._send(fx, e.peer, {"op": "start", "args": f.arg, "g": g}, segs)


def _h_destroy(core, fx, p, msg, rid, nfds, now):
    e = _own_enclave(core, p, msg)
    core._destroy(fx, e, "destroyed by its host")
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _h_attest(core, fx, p, msg, rid, nfds, now):
    e = _own_enclave(core, p, msg)
    nonce = get_u64(msg, "nonce")
    rep = core.report(e, nonce)
    core._send(fx, p.id, {"op": "r", "rid": rid, "report": rep})


def _h_ps(core, fx, p, msg, rid, nfds, now):
    encl = [{"eid": e.eid, "handle": e.handle, "name": e.name, "type": e.type,
             "state": e.state, "host": e.host, "pid": e.pid}
            for e in core.slots if e is not None]
    regs = [{"id": r.id, "kind": r.kind, "vaddr": r.vaddr, "size": r.length,
             "owner": r.owner, "lenders": list(r.stack)} for r in core.regions.values()]
    core._send(fx, p.id, {"op": "r", "rid": rid, "enclaves": encl, "regions": regs,
                          "hosts": sum(1 for q in core.peers.values() if q.kind == HOST)})


_HOST_OPS = {
    "shmget": _h_shmget, "shmat": _h_attach, "shmdt": _h_detach, "shmctl": _h_ctl,
    "sget": _h_sget, "sat": _h_attach, "sdt": _h_detach, "sctl": _h_ctl,
    "create": _h_create, "run": _h_run, "destroy": _h_destroy, "attest": _h_attest,
    "ps": _h_ps,
}


# ---------------------------------------------------------------------- enclave ops
def _e_mmap(core, fx, p, e, msg, now):
    size = get_u64(msg, "size")
    r = core._new_region(fx, p, size, "relay", "mmap")
    g, segs = core._grants(p.id, [r])
    core._send(fx, p.id, {"op": "r", "vaddr": r.vaddr, "g": g}, segs)


def _e_unmap(core, fx, p, e, msg, now):
    vaddr = get_u64(msg, "vaddr")
    size = get_u64(msg, "size")
    r = core.by_vaddr.get(vaddr)
    if r is None or r.kind != "relay" or r.owner != p.id:
        raise E.NotOwned(f"no region at {vaddr:#x} owned by this enclave")
    if r.stack:
        raise E.RegionLoaned(f"region {vaddr:#x} is on loan to this enclave")
    if size != r.length:
        raise E.BadSize(f"unmap size {size:#x} != region size {r.length:#x}")
    core._free_region(fx, r)
    core._send(fx, p.id, {"op": "r"})


def _e_acquire(core, fx, p, e, msg, now):
    name = get_name(msg, "name")
    s = core.servers.get(name)
    if s is None:
        raise E.NoSuchServer(f"no server named {name!r}")
    core._send(fx, p.id, {"op": "r", "handle": s.handle})


def _e_call(core, fx, p, e, msg, now):
    a = msg.get("a")
    if type(a) is not list or len(a) != 6:
        raise Invalid("'a' must be the 6 fields of call_enclave_arg_t")
    for v in a:
        if type(v) is not int or v < 0 or v > U64:
            check_u64(v, "call_enclave_arg_t field")
    nb = msg.get("nb", False)
    if nb is not False and nb is not True:
        raise Invalid("field 'nb' must be a boolean")
    timeout = msg.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not 0 <= timeout < 1e9):
        raise Invalid("timeout must be a non-negative number of seconds")
    if e.frame_out is not None:
        raise E.BadState("already waiting for a call")
    if e.state not in (RUNNING, SERVING):
        raise E.BadState(f"enclave is {e.state}; only a running enclave may call")
    s = core._enclave(get_int(msg, "handle"))
    if s.type != SERVER:
        raise E.UnknownHandle(f"enclave {s.name!r} is not a server")
    # cycle: the server is the caller itself or somewhere up the caller's chain
    cur = e
    while cur is not None:
        if cur is s:
            raise E.CallCycle(f"server {s.name!r} is already on the call chain")
        f_in = cur.frame_in
        if f_in is None or f_in.kind != "call":
            break
        cp = core.peers.get(f_in.caller)
        cur = cp.enclave if cp is not None else None
    # Fix: ... or the server waits, down its own (running or queued) calls, for the caller:
    # e.g. s1 queued on busy s2, then s2 calls s1.  The chain walk above misses it, and both
    # would wait for each other until a queue deadline.
    cur, hops = s, 0
    while cur.frame_out is not None and hops <= len(core.slots):
        cur, hops = cur.frame_out.server, hops + 1
        if cur is e:
            raise E.CallCycle(f"server {s.name!r} waits for this caller")
    req_vaddr, req_size = a[2], a[3]
    loans = []
    if req_vaddr:
        if req_vaddr % PAGE:
            raise E.Unaligned(f"req_vaddr {req_vaddr:#x} is not page aligned")
        if req_size == 0 or req_size % PAGE:
            raise E.BadSize(f"req_size {req_size:#x} must be a non-zero page multiple")
        r = core.by_vaddr.get(req_vaddr)
        if r is None or r.kind != "relay" or r.owner != p.id:
            raise E.NotOwned(f"no region at {req_vaddr:#x} owned by the caller")
        if req_size != r.length:
            raise E.BadSize(f"req_size {req_size:#x} must cover the whole region "
                            f"({r.length:#x})")
        loans.append(r)
    f = Frame("call", p.id, s, loans, a)
    e.frame_out = f
    for r in loans:
        r.stack.append(p.id)
        r.owner = None                    # in escrow until the server takes the call
    if s.state == IDLE and not s.queue:
        core._dispatch(fx, f)
        return
    if nb:
        e.frame_out = None
        for r in loans:
            r.stack.pop()
            r.owner = p.id
        g, segs = core._grants(p.id, loans)
        m = _err(E.ServerBusy(f"server {s.name!r} is busy"))
        m["g"] = g
        core._send(fx, p.id, m, segs)
        return
    if timeout is None:
        timeout = core.limits.queue_timeout
    f.deadline = now + timeout
    f.queued = True
    s.queue.append(f)
    core.queued.append(f)


def _e_ret(core, fx, p, e, msg, now):
    f = e.frame_in
    if e.type != SERVER or f is None or e.state != SERVING:
        raise E.BadState("SERVER_RETURN outside a call")
    if e.frame_out is not None:
        raise E.BadState("SERVER_RETURN while waiting for a nested call")
    a = msg.get("a")
    if type(a) is not list or len(a) != 6:
        raise Invalid("'a' must be the 6 fields of call_enclave_arg_t")
    for v in a:
        if type(v) is not int or v < 0 or v > U64:
            check_u64(v, "call_enclave_arg_t field")
    resp_vaddr = a[4]
    resp = None
    bad = None
    if resp_vaddr:
        r = core.by_vaddr.get(resp_vaddr)
        if r is None or r.kind != "relay" or r.owner != p.id:
            bad = E.BadReturn(f"server {e.name!r} returned resp_vaddr {resp_vaddr:#x} "
                              f"that it does not own")
        else:
            resp = r
    e.frame_in = None
    e.state = IDLE
    if bad is not None:
        core._finish_call(fx, f, None, None, bad)
        core._send(fx, p.id, _err(bad))
    else:
        core._finish_call(fx, f, resp, a[1])
    core._next_call(fx, e)


def _e_exit(core, fx, p, e, msg, now):
    if e.type != NORMAL or e.state != RUNNING or e.frame_out is not None:
        raise E.BadState("EAPP_RETURN outside a run")
    v = get_int(msg, "v")
    f = e.frame_in
    e.frame_in = None
    core._finish_run(fx, f, v)
    e.why = f"returned {v}"
    core._settle(fx, e)
    fx.append(("kill", e.peer))


def _e_fault(core, fx, p, e, msg, now):
    why = get_str(msg, "why", 8192, default="fault")
    f = e.frame_in
    if e.type == SERVER and f is not None and e.frame_out is None:
        # the handler raised: the server survives, the caller gets the reason
        e.frame_in = None
        e.state = IDLE
        core._finish_call(fx, f, None, None, E.EnclaveFault(f"server {e.name!r}: {why}"))
        core._next_call(fx, e)
        return
    e.why = why
    core._settle(fx, e)
    fx.append(("kill", e.peer))


def _e_report(core, fx, p, e, msg, now):
    nonce = get_u64(msg, "nonce")
    name = msg.get("name")
    if name is None:
        target = e
    else:
        name = get_name(msg, "name")
        target = core.servers.get(name)
        if target is None:
            raise E.NoSuchServer(f"no server named {name!r}")
    core._send(fx, p.id, {"op": "r", "report": core.report(target, nonce)})


_ENCLAVE_OPS = {
    "mmap": _e_mmap, "unmap": _e_unmap, "acquire": _e_acquire, "call": _e_call,
    "ret": _e_ret, "exit": _e_exit, "fault": _e_fault, "report": _e_report,
}
