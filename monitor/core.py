"""The monitor's logic as a pure state machine ("sans-IO").

The :class:`Core` holds every fact the monitor knows -- peers, enclaves, the
server registry, regions and their owners, loans, call frames, queues,
deadlines, tombstones -- and changes it only in response to events.  Each event
method returns a list of typed *effects* (:mod:`tvmrt.monitor.effects`) that the
I/O shell (:mod:`tvmrt.monitor.daemon`) performs.  No sockets, no syscalls, no
clock, no randomness happen here: time comes in as an argument, configuration
(arenas, page size, attestation key, limits) as one :class:`Config`.  That is
what lets the tests drive it exhaustively.  The wire protocol is docs/protocol.md.

Events (methods):
    host_connected(uid, pid) -> (peer, effects)
    message(peer, msg, nfds, now) -> effects        a decoded frame from a peer
    disconnected(peer) -> effects                   EOF on a peer's socket (or cut off)
    spawned(peer, pid) / spawn_failed(peer, why)    zygote reports
    exited(peer, how, now) -> effects               zygote reaped an enclave process
    segment_created(seg) / segment_failed(seg, why) the result of a NewSeg effect
    segment_tampered(seg, send) -> effects          a Send's granted segment was resized
                                                    (for a shell that cannot seal
                                                    segments; the daemon seals them)
    isolation_violation(peer, seg, verify)          strict mode: a Verify found ``peer``
                                                    still mapping segment ``seg``
    tick(now) -> effects                            a deadline (next_deadline()) passed
    shutdown() -> effects                           destroy everything

Effects:
    Send(peer, msg, segs)              send msg with the fds of segments ``segs``
    Spawn(peer, spec, shm_seg, stdio)  start an enclave process bound to ``peer``;
                                       stdio "message" (the 2 fds of the message being
                                       handled) or "null" (/dev/null)
    Kill(peer)                         make sure the enclave process of ``peer`` is dead
    Signal(peer, sig)                  stop ("stop") or continue ("cont") its process group
    Close(peer)                        close the peer's socket
    NewSeg(seg, size, arena)           create a segment, report segment_created/failed
    FreeSeg(seg)                       close the monitor's fd of a segment
    SplitSeg(seg, parent, size)        a second fd on ``parent``'s file (a split region's
                                       half), report segment_created/failed; ``size``
                                       is the file's, checked at grants
    Log(text)                          a line for the monitor's log
    Stats(msg)                         put the monitor's own pid, fds, RSS into
                                       ``msg["monitor"]`` (the Send of msg follows)
    Verify(checks, send)               strict mode: perform ``send`` once no earlier
                                       holder maps a segment it grants (/proc/PID/maps)

Strict mode (``Config.isolation == "strict"``, DESIGN.md §2 ``remap``): a relay grant
always carries the fd (kind ``"remap"``: the receiver unmaps the region when it gives it
up, so it keeps neither mapping nor fd), and every Send that grants a relay region is
wrapped in a ``Verify`` naming each live peer that ever had the segment -- its receiver
too, which gave it up when it last held it.  A peer found still mapping it is a
violator: an enclave is killed and the Send is held until its process is reaped
(nothing is granted while it lives), then goes out with the grants still valid, a reply
turned into an ``IsolationViolation`` error; a host is cut off and the regions it still
maps are freed.  A Send is recorded (the segments its fds give the receiver, the drops
it carries) when it is emitted, by ``_send`` alone: one held is not emitted, one a
Verify stopped is undone (``_unsend``).  The default mode never builds a Verify: its
paths are the methods of the class, strict mode's are bound per instance in
``__init__``.

Every change of ownership goes through ``_lend``, ``_take``, ``_unlend``, ``_give``,
``_return_to_lender``, ``_skip_lender`` and ``_free``; every change of an enclave's
state through ``_set_state`` and its table ``TRANSITIONS``.  They refuse an illegal
change with :class:`CoreBug` (the shell cuts off the peer whose event hit it).

Ownership rules (DESIGN.md §2-§4):
    * a relay region has exactly one owner (a peer) or is in escrow (owner None)
      while a queued call waits; ``stack`` lists the lenders it must return to;
    * loans always return to the nearest live lender at the same address;
    * a region nobody can own any more is freed.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from tvmrt import errors as E
from tvmrt._attest import ENCLAVE_KEY, KEY_MAX, STORAGE_KEY, Signer, measure as measure

from . import schema
from .config import Config
from .effects import (
    Close,
    FreeSeg,
    Kill,
    Log,
    NewSeg,
    Send,
    Signal,
    Spawn,
    SplitSeg,
    Stats,
    Verify,
)
from .schema import U64, Invalid

NORMAL = 0
SERVER = 1

HOST = "host"
ENCLAVE = "enclave"

# enclave states
STARTING = "starting"    # spawned, its module code not run yet (create not answered)
CREATED = "created"      # normal enclave ready, waiting for run
RUNNING = "running"      # normal enclave in its run
IDLE = "idle"            # server waiting for calls
SERVING = "serving"      # server inside a call
DONE = "done"            # finished or dead, waiting for the process to be reaped

#: the legal enclave state changes (h11 style): state -> states it may go to
TRANSITIONS: dict[str, frozenset[str]] = {
    STARTING: frozenset({CREATED, IDLE, DONE}),
    CREATED: frozenset({RUNNING, DONE}),
    RUNNING: frozenset({DONE}),
    IDLE: frozenset({SERVING, DONE}),
    SERVING: frozenset({IDLE, DONE}),
    DONE: frozenset(),
}

#: Stop is an overlay on these states, not a state of its own: a stopped enclave keeps
#: the state it had (what it was doing), because messages its process sent before the
#: SIGSTOP took effect are still handled as in that state (a server's ``ret`` in flight
#: makes it IDLE while stopped).  ``Enclave.stopped_by`` names the enclave whose stop
#: stopped it (itself, or the root of the call chain it serves); ``ps`` shows the state
#: ``stopped`` (and the one below as ``was``).  A stopped enclave is never dispatched a
#: call (an idle stopped instance is not idle for the pool) and never started (run).
#: The states in which an enclave may be stopped:
STOPPABLE = frozenset({CREATED, RUNNING, IDLE, SERVING})
STOPPED = "stopped"      # shown by ps; never in Enclave.state

FIRST_ID = 0x10000       # host-visible shm / schrodinger ids start here, as in Penglai

#: fault codes an enclave may name in a ``fault`` notification
FAULT_CLASSES: dict[int, type[E.TvmError]] = {
    E.EnclaveFault.code: E.EnclaveFault,
    E.BadExitValue.code: E.BadExitValue,
    E.BadReturn.code: E.BadReturn,
}


#: what a run may fail with (else EnclaveFault)
_RUN_ERRORS = frozenset(FAULT_CLASSES.values()) | {E.IsolationViolation}


class CoreBug(Exception):
    """An illegal transition was attempted: a bug in the core, not a peer's fault."""


class Account:
    """Quota counters: of one host *process* (shared by all its connections, so that
    opening more connections does not buy more quota) or of one enclave."""
    __slots__ = ("key", "peers", "regions", "bytes")

    def __init__(self, key):
        self.key = key
        self.peers: set[int] = set()      # host connections charged to it
        self.regions = 0                  # regions created and not freed yet
        self.bytes = 0


class Peer:
    __slots__ = ("id", "kind", "uid", "pid", "alive", "segs", "drops", "account",
                 "enclave", "enclaves", "eof", "how", "tombs")

    def __init__(self, pid_, kind):
        self.id = pid_
        self.kind = kind
        self.uid = None
        self.pid = None
        self.alive = True
        self.segs: set[int] = set()   # segments this peer's process maps (fd already sent)
        self.drops: list[int] = []    # segments it must unmap, piggybacked on the next message
        self.account = Account(("peer", pid_))    # a host's is replaced by its process's
        self.enclave: Enclave = None          # type: ignore[assignment]  # enclave peers only
        self.enclaves: set[int] = set()       # enclave peers created by this host
        self.eof = False              # enclave socket reached EOF
        self.how: str | None = None   # exit description from the zygote
        self.tombs: deque[int] = deque()      # host: handles of its finished enclaves


class Pool:
    """The instances of one server name.  Callers queue here (FIFO) and each call is
    dispatched to an idle instance; the pool lives while one instance does.  Its handle
    is its first instance's, and stays valid when that instance dies."""
    __slots__ = ("name", "handle", "host", "members", "queue", "create_rid", "allow")

    def __init__(self, name, host, allow):
        self.name = name
        self.handle = -1                      # the first instance's handle (set at create)
        self.host = host                      # peer id of the host that created it
        # who may acquire and call it: an Account, the enclaves of that host process (the
        # default: its creator's); True, any enclave; else a frozenset of enclave names
        # (str) and measurements (32 bytes)
        self.allow = allow
        self.members: list[Enclave] = []      # instances, in creation order (dead ones too)
        self.queue: deque[Frame] = deque()    # calls waiting for an idle instance
        self.create_rid: int | None = None    # the host's create, answered when all ready

    def live(self) -> list[Enclave]:
        return [m for m in self.members if m.state != DONE]

    def may_call(self, e) -> bool:
        """May enclave ``e`` acquire and call this server?  (``e.account`` of an
        enclave is its own; the host process it belongs to is ``e.hostacct``.)"""
        a = self.allow
        if type(a) is frozenset:
            return e.name in a or e.measurement in a
        return a is True or a is e.hostacct


_NO_QUEUE: deque = deque()       # a normal enclave's (always empty) queue


class Enclave:
    __slots__ = ("peer", "eid", "gen", "name", "type", "host", "state", "frame_in", "out",
                 "measurement", "shm", "pool", "pid", "end", "create_rid", "sandbox",
                 "hostacct", "stopped_by")

    def __init__(self, peer, eid, gen, name, etype, host, measurement, sandbox="off"):
        self.peer = peer
        self.eid = eid
        self.gen = gen
        self.name = name
        self.type = etype
        self.host = host
        self.state = STARTING
        self.frame_in: Frame | None = None    # the call (or run) this enclave is serving
        self.out: dict[int, Frame] = {}       # rid -> call this enclave waits for
        self.measurement = measurement
        self.shm: tuple[int, int] | None = None
        self.pool: Pool | None = None         # a server's pool of instances
        self.pid = None
        self.end: tuple[type[E.TvmError], str] | None = None   # what ended it
        self.create_rid: int | None = None    # the host's create, answered at ready
        #: the sandbox its process enters (Config.sandbox when it was created); shown by ps
        self.sandbox = sandbox
        #: the quota account of its host process: who may call a server (Pool.may_call)
        self.hostacct: Account | None = None
        #: the root of the stop that stopped this process (itself or a caller down whose
        #: chain it serves), None while it is not stopped (see STOPPABLE)
        self.stopped_by: Enclave | None = None

    @property
    def handle(self):
        return (self.gen << 32) | self.eid

    @property
    def queue(self) -> deque[Frame]:
        """Calls waiting for this server (its pool's queue, shared by its instances)."""
        return self.pool.queue if self.pool is not None else _NO_QUEUE


class Region:
    __slots__ = ("id", "seg", "vaddr", "length", "kind", "arena", "creator", "owner",
                 "stack", "mappers", "revoked", "prev", "account", "off")

    def __init__(self, rid, seg, vaddr, length, kind, arena, creator):
        self.id = rid
        self.seg = seg
        self.vaddr = vaddr
        self.length = length
        self.kind = kind          # "shm" or "relay"
        self.arena = arena        # the arena its address came from
        self.creator = creator
        self.owner = creator if kind == "relay" else None
        self.stack: list[int] = []    # lenders, innermost last
        self.mappers: set[int] = set()    # peers whose process maps the segment
        self.revoked = False      # shm id revoked by shmctl (or no fd exists)
        self.prev = None          # the owner before the current one (violation suspect)
        self.account: Account | None = None   # charged for it (its creator's)
        self.off = 0              # where it starts in its segment's file (split halves)


class Frame:
    """One run (host -> normal enclave) or call (enclave -> server)."""
    __slots__ = ("kind", "caller", "server", "loans", "arg", "rid", "deadline", "full",
                 "queued", "answered", "paused")

    def __init__(self, kind, caller, server, loans, arg, rid):
        self.kind = kind          # "run" or "call"
        self.caller = caller      # peer id
        self.server = server      # Enclave
        self.loans = loans        # [Region]
        self.arg = arg            # list of 6 ints (call) / [a10..a14] (run)
        self.rid = rid            # the caller's request id
        self.deadline = None
        self.full = False         # the deadline covers the server's run too (a timeout given)
        self.queued = False
        self.answered = False     # the caller has had its answer (a timeout): late results go
        # run: the enclave's rid of eapp_return_relay_page while the host has the page;
        # asyn: the sender's eid (for get_caller_id; the sender may be gone)
        self.paused: int | None = None


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


_tuple_new = tuple.__new__      # builds a NamedTuple without its Python-level __new__


def _err(exc, rid=None):
    msg = {"op": "e", "c": exc.code, "why": exc.reason}
    if rid is not None:
        msg["rid"] = rid
    return msg


def _timeout(msg, default):
    """The (schema-checked) ``timeout`` of ``msg``, or ``default`` when it has none."""
    t = msg.get("timeout")
    return default if t is None else t


class Core:
    """The monitor state machine.  See the module docstring for events and effects."""

    def __init__(self, config: Config):
        if not isinstance(config, Config):
            raise TypeError("Core needs a Config (there is no default attestation key)")
        self.config = config
        # signing and key derivation are computation: the key is in the Config, no I/O
        self.signer = Signer(config.key)
        self.page = config.page
        self.peers: dict[int, Peer] = {}
        self.slots: list[Enclave | None] = []     # eid -> Enclave or None
        self.gens: list[int] = []                 # eid -> generation of the next occupant
        self.servers: dict[str, Pool] = {}
        self.pools: dict[int, Pool] = {}          # pool handle -> Pool
        self.regions: dict[int, Region] = {}      # host-visible id -> Region
        self.by_vaddr: dict[int, Region] = {}
        self.arenas = {k: VaAllocator(b, s) for k, (b, s) in config.arenas.items()}
        self._next_peer = 1
        self._next_id = FIRST_ID
        self._next_seg = 1
        self.seg_region: dict[int, Region] = {}
        self.pending_seg: dict[int, tuple[int, int, str]] = {}   # seg -> (peer, rid, op)
        # deadlines: Frame (call / run), Enclave (create), ("eof", peer) -> time
        self.timers: dict[Any, float] = {}
        # handle -> (host, error class, reason) of finished enclaves
        self.tombs: dict[int, tuple[int, type[E.TvmError], str]] = {}
        # quota accounts of host processes (uid, pid): shared by their connections
        self.accounts: dict[tuple, Account] = {}
        # split regions: seg -> size of the file it shares with its family
        self.fsize: dict[int, int] = {}
        self.split_from: dict[int, Region] = {}   # second half's seg -> first half
        # strict mode: Sends held until an enclave's process is reaped: peer ->
        # [(Send, why)], why set when it is a violator (a reply then becomes its error)
        self.held: dict[int, list[tuple[Send, str | None]]] = {}
        if config.isolation == "strict":
            # instance attributes shadow the default methods: the default mode's paths
            # stay exactly as they are (no mode test on them)
            self._grants = self._grants_strict          # type: ignore[method-assign]
            self._send = self._send_strict              # type: ignore[method-assign]

    # ------------------------------------------------------------------ transitions
    def _set_state(self, e: Enclave, new: str) -> None:
        if new not in TRANSITIONS[e.state]:
            raise CoreBug(f"enclave {e.name!r}: illegal transition {e.state} -> {new}")
        e.state = new

    def _lend(self, r: Region, frm: int, to: int | None) -> None:
        """``frm`` lends ``r`` to ``to`` (None: escrow, for a queued call)."""
        if r.owner != frm or r.kind != "relay":
            raise CoreBug(f"lend of region {r.id:#x} by {frm}, owned by {r.owner}")
        r.stack.append(frm)
        r.prev = frm
        r.owner = to

    def _take(self, r: Region, to: int) -> None:
        """The server ``to`` takes an escrowed loan (its call is dispatched)."""
        if r.owner is not None or not r.stack:
            raise CoreBug(f"take of region {r.id:#x} that is not in escrow")
        r.owner = to

    def _unlend(self, r: Region, frm: int) -> None:
        """An escrowed loan that never reached its server goes back to ``frm``."""
        if r.owner is not None or not r.stack or r.stack[-1] != frm:
            raise CoreBug(f"unlend of region {r.id:#x} to {frm}")
        r.stack.pop()
        r.owner = frm

    def _give(self, r: Region, frm: int, to: int) -> None:
        """Ownership of ``r`` moves from ``frm`` to ``to`` for good (a response region)."""
        if r.owner != frm or r.stack:
            raise CoreBug(f"give of region {r.id:#x} by {frm}, owned by {r.owner}")
        r.prev = frm
        r.owner = to

    def _return_to_lender(self, fx, r: Region):
        """Give a loaned region back to the nearest live lender; free it if none is left."""
        while r.stack:
            lender = r.stack.pop()
            if self._alive(lender):
                if r.owner is not None:
                    r.prev = r.owner
                r.owner = lender
                return lender
        self._free(fx, r)
        return None

    @staticmethod
    def _skip_lender(r: Region, peer: int) -> None:
        """``peer`` ended the frame in which it holds ``r`` while ``r`` is lent on: the
        region goes straight back past it."""
        st = r.stack
        for i in range(len(st) - 1, -1, -1):
            if st[i] == peer:
                del st[i]
                return

    def _free(self, fx, r: Region) -> None:
        if self.regions.pop(r.id, None) is None:
            return
        self.by_vaddr.pop(r.vaddr, None)
        self.seg_region.pop(r.seg, None)
        if r.off or self.fsize:
            self.fsize.pop(r.seg, None)
        self.arenas[r.arena].release(r.vaddr, r.length)
        a = r.account
        if a is not None:
            r.account = None
            a.regions -= 1
            a.bytes -= r.length
            self._drop_account(a)
        for m in r.mappers:
            p = self.peers.get(m)
            if p is not None and p.alive and r.seg in p.segs:
                p.segs.discard(r.seg)
                p.drops.append(r.seg)
        if not r.revoked:
            fx.append(FreeSeg(r.seg))
        r.owner = None
        r.stack = []

    # ------------------------------------------------------------------ helpers
    def _new_peer(self, kind):
        p = Peer(self._next_peer, kind)
        self._next_peer += 1
        self.peers[p.id] = p
        return p

    def _send(self, fx, peer_id, msg, segs: Sequence[int] = ()):
        """Queue a send, piggybacking pending unmaps for that peer.

        The one place where the core's record of what a process maps changes with a
        grant: the segments whose fds go (``segs``) become the receiver's (``Peer.segs``,
        ``Region.mappers``) as the Send is emitted, not when its grants are built
        (strict mode may hold a Send, or have it refused by a Verify:
        :meth:`_send_strict`, :meth:`_unsend`)."""
        p = self.peers.get(peer_id)
        if p is None or not p.alive:
            return
        if p.drops:
            d = msg.get("d")
            msg["d"] = p.drops + d if d else p.drops
            p.drops = []
        if segs:
            ps = p.segs
            sr = self.seg_region
            for s in segs:
                ps.add(s)
                r = sr.get(s)
                if r is not None:
                    r.mappers.add(peer_id)
        fx.append(_tuple_new(Send, (peer_id, msg, segs)))

    def _grants(self, peer_id, regions):
        """Grant list for ``regions`` to ``peer_id`` and the segments whose fds must go
        (recorded as the receiver's by :meth:`_send`, when the grant goes).

        A host gets no grant for a schrodinger region it does not map (it detached it, or
        never attached it): it owns it again, and attaches it when it wants.
        """
        if not regions:
            return [], []
        p = self.peers[peer_id]
        host = p.kind == HOST
        g, segs = [], []
        for r in regions:
            need = r.seg not in p.segs
            if need:
                if host:
                    continue
                segs.append(r.seg)
            # has_fd: 1 + the region's offset in the file (a split half starts inside it)
            g.append([r.seg, r.vaddr, r.length, 1 + r.off if need else 0, r.kind])
        return g, segs

    def _grants_strict(self, peer_id, regions):
        """:meth:`_grants` of strict mode: a relay region always goes with its fd, as
        kind ``"remap"`` (its receiver gave up mapping and fd when it last gave it up).
        A host still gets no grant for a schrodinger region it does not attach."""
        if not regions:
            return [], []
        p = self.peers[peer_id]
        host = p.kind == HOST
        g, segs = [], []
        for r in regions:
            known = r.seg in p.segs
            if r.kind == "relay":
                if host and not known:
                    continue
                segs.append(r.seg)
                g.append([r.seg, r.vaddr, r.length, 1 + r.off, "remap"])
                continue
            if not known:
                if host:
                    continue
                segs.append(r.seg)
            g.append([r.seg, r.vaddr, r.length, 0 if known else 1 + r.off, r.kind])
        return g, segs

    def _kind(self, r: Region) -> str:
        """The kind a grant of ``r`` names: ``"remap"`` for a relay region in strict mode."""
        if r.kind == "relay" and self.config.isolation == "strict":
            return "remap"
        return r.kind

    def _send_strict(self, fx, peer_id, msg, segs: Sequence[int] = ()):
        """:meth:`_send` of strict mode: a Send granting relay regions becomes a
        ``Verify`` of every live peer that ever had one of those segments (its
        ``mappers``: past holders, lenders included, and the receiver if it had it
        before -- none may map it now).

        A Send that must wait for a holder's process to be reaped is held *unsent*:
        nothing of it is recorded (the receiver does not map its segments yet) and the
        drops it would have carried stay the receiver's, for its next message."""
        p = self.peers.get(peer_id)
        if p is None or not p.alive:
            return
        g = msg.get("g")
        checks = []
        if g:
            for x in g:
                if x[4] != "remap":
                    continue
                r = self.seg_region.get(x[0])
                if r is None:
                    continue
                # every holder it knows of, and every enclave that had it and has ended
                # (``_settle`` forgets it as a mapper) but whose process is not reaped yet
                who = set(r.mappers)
                who.update(q.id for q in self.peers.values()
                           if q.kind == ENCLAVE and x[0] in q.segs
                           and q.enclave.state == DONE)
                # the receiver too: in remap mode it unmapped the region when it last gave
                # it up, and its runtime's fresh mapping would hide (replace) a rogue one
                # made at the same address; a peer that never had the fd is not checked
                for m in sorted(who):
                    q = self.peers.get(m)
                    if q is None:
                        continue    # gone: an enclave's process was reaped, its maps too
                    if q.kind == ENCLAVE and q.enclave.state == DONE:
                        # finished or killed, its process not reaped yet: it may still
                        # map the segment, so the Send waits for the reaping (then goes
                        # through here again)
                        self.held.setdefault(m, []).append(
                            (self._unsent(p, Send(peer_id, msg, segs)), None))
                        return
                    pid_ = q.pid if q.kind == HOST else q.enclave.pid
                    if pid_ is not None:
                        checks.append((m, pid_, x[0]))
        if not checks:
            Core._send(self, fx, peer_id, msg, segs)
            return
        # what emitting it records, for :meth:`_unsend` if the Verify stops it
        ps = p.segs
        fresh = tuple(s for s in segs if s not in ps)
        sr = self.seg_region
        newm = tuple(s for s in segs
                     if (r := sr.get(s)) is not None and peer_id not in r.mappers)
        Core._send(self, fx, peer_id, msg, segs)
        fx[-1] = Verify(tuple(sorted(checks)), fx[-1], (fresh, newm))

    def _unsent(self, p: Peer, send: Send) -> Send:
        """``send`` to ``p`` does not go now: the drops it carries go back to ``p``'s
        pending ones (they ride on its next message; drops never wait).  Returns it
        without them."""
        d = send.msg.get("d")
        if not d:
            return send
        msg = dict(send.msg)
        del msg["d"]
        p.drops = list(d) + p.drops
        return Send(send.peer, msg, send.segs)

    def _unsend(self, v: Verify) -> Send:
        """The shell did not perform ``v.send`` (a check of ``v`` failed): undo what
        emitting it recorded -- the mappings its fds were to make, the drops it
        carried -- and return it as it was built, to be held or sent again."""
        send = v.send
        d = self.peers.get(send.peer)
        if d is None:
            return send
        fresh, newm = v.undo
        for s in fresh:
            d.segs.discard(s)
        for s in newm:
            r = self.seg_region.get(s)
            if r is not None:
                r.mappers.discard(send.peer)
        return self._unsent(d, send)

    def _waits_for(self, start: Enclave, target: Enclave) -> bool:
        """Does ``start`` wait (through its outgoing calls, transitively) for ``target``?"""
        todo = [start]
        seen: set[int] = set()
        while todo:
            cur = todo.pop()
            if cur is target:
                return True
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            for f in cur.out.values():
                # a call waits for its server's whole pool until an instance takes it
                srv = f.server
                if f.queued and srv.pool is not None:
                    todo.extend(srv.pool.members)
                else:
                    todo.append(srv)
        return False

    def _alive(self, peer_id):
        p = self.peers.get(peer_id)
        return p is not None and p.alive

    def _new_region(self, fx, creator: Peer, size, kind, arena, rid, op):
        cfg = self.config
        if size <= 0 or size > cfg.max_region:
            raise E.BadSize(f"size {size:#x} out of range (1 .. {cfg.max_region:#x})")
        if size % self.page:
            raise E.BadSize(f"size {size:#x} is not a page multiple")
        a = creator.account
        if a.regions + 1 > cfg.max_regions or a.bytes + size > cfg.max_bytes:
            who = "this host process" if creator.kind == HOST else "this enclave"
            raise E.QuotaExceeded(
                f"quota: {who} has {a.regions} regions, {a.bytes} bytes in use "
                f"(at most {cfg.max_regions}, {cfg.max_bytes})")
        vaddr = self.arenas[arena].alloc(size)
        if vaddr is None:
            raise E.NoMemory(f"no room for {size:#x} bytes in the {arena} arena")
        r = Region(self._next_id, self._next_seg, vaddr, size, kind, arena, creator.id)
        self._next_id += 1
        self._next_seg += 1
        self.regions[r.id] = r
        self.by_vaddr[vaddr] = r
        self.seg_region[r.seg] = r
        a.regions += 1
        a.bytes += size
        r.account = a
        self.pending_seg[r.seg] = (creator.id, rid, op)
        fx.append(NewSeg(r.seg, size, arena))
        return r

    def _enclave(self, handle, host=None):
        """The live enclave of ``handle``; a finished one raises what ended it (its
        tombstone; for host requests only to its own host)."""
        if type(handle) is not int or handle < 0:
            raise E.UnknownHandle(f"bad handle {handle!r}")
        eid, gen = handle & 0xFFFFFFFF, handle >> 32
        if eid < len(self.slots):
            e = self.slots[eid]
            if e is not None and e.gen == gen and e.state != DONE:
                return e
        t = self.tombs.get(handle)
        if t is not None and (host is None or t[0] == host):
            raise t[1](t[2])
        raise E.UnknownHandle(f"no live enclave {handle:#x}")

    def _host_region(self, peer, rid_, kind):
        r = self.regions.get(rid_)
        if r is None or r.kind != kind or r.revoked or r.seg in self.pending_seg:
            raise E.UnknownId(f"no {kind} region with id {rid_!r}")
        if r.creator != peer.id:
            raise E.NotPermitted(f"region {rid_:#x} belongs to another host")
        return r

    def _bury(self, e: Enclave) -> None:
        """Keep what ended ``e`` for later requests on its handle (bounded, per host)."""
        h = self.peers.get(e.host)
        if h is None or not h.alive or e.end is None:
            return
        self.tombs[e.handle] = (h.id, e.end[0], e.end[1])
        h.tombs.append(e.handle)
        while len(h.tombs) > self.config.max_tombstones:
            self.tombs.pop(h.tombs.popleft(), None)

    # ------------------------------------------------------------------ events
    def host_connected(self, uid, pid):
        """A host connection from process ``pid`` of ``uid``: its quotas are those of
        the process, whatever number of connections it opens."""
        p = self._new_peer(HOST)
        p.uid, p.pid = uid, pid
        key = ("host", uid, pid)
        a = self.accounts.get(key)
        if a is None:
            a = self.accounts[key] = Account(key)
        a.peers.add(p.id)
        p.account = a
        return p.id, [Log(f"host {p.id} connected (pid {pid}, uid {uid})")]

    def _drop_account(self, a: Account) -> None:
        """Forget a host process's account once nothing is charged to it any more."""
        if not a.peers and not a.regions and self.accounts.get(a.key) is a:
            del self.accounts[a.key]

    def _host_enclaves(self, p: Peer) -> int:
        """Live enclaves of the host process of connection ``p`` (all connections)."""
        peers = self.peers
        return sum(1 for hp in p.account.peers for ep in peers[hp].enclaves
                   if peers[ep].enclave.state != DONE)

    def message(self, peer_id, msg, nfds=0, now=0.0):
        """Handle one decoded frame from ``peer_id``: checked against its op's schema
        (:mod:`tvmrt.monitor.schema`), then handed to the op's handler.  A refusal is an
        error reply (to a request: with its rid) that also gives back the regions the
        sender's runtime revoked for the message (the schema names them)."""
        p = self.peers.get(peer_id)
        if p is None or not p.alive:
            return []
        fx: list = []
        op = msg.get("op")
        rid = msg.get("rid")
        if type(rid) is not int or rid <= 0 or rid > U64:
            rid = None
        e = p.enclave
        spec = (schema.HOST if e is None else schema.ENCLAVE).get(op)
        try:
            if spec is None:
                raise E.LocalProtocolError(f"unknown op {op!r:.40}")
            if not spec.request:
                rid = None          # a notification: its refusal is an unsolicited error
            elif rid is None:
                raise E.LocalProtocolError(f"request {op!r} without a valid rid")
            spec.check(msg, nfds, self.config)
            if e is None:
                _HOST_OPS[op](self, fx, p, msg, rid, nfds, now)
            elif spec.request:
                _ENCLAVE_OPS[op](self, fx, p, e, msg, rid, now)
            else:
                _ENCLAVE_NOTES[op](self, fx, p, e, msg, now)
        except (Invalid, E.TvmError) as exc:
            if getattr(exc, "norid", False):
                rid = None
            if isinstance(exc, Invalid):
                exc = E.InvalidArgument(str(exc))
            reply = _err(exc, rid)
            segs: list = []
            back = self._revoked(p, spec, msg) if spec is not None and spec.revokes else ()
            if back:
                reply["g"], segs = self._grants(peer_id, back)
            self._send(fx, peer_id, reply, segs)
        return fx

    def _revoked(self, p: Peer, spec: schema.Op, msg: dict) -> list:
        """The regions ``p``'s runtime revoked before sending the refused ``msg`` (as
        its schema names them) that ``p`` still owns and maps: a refused message moved
        nothing, so they are granted back with the error.  Naming a region ``p`` does
        not own gets nothing back."""
        out: list = []
        assert spec.revokes is not None
        for by, key in spec.revokes(msg):
            r = self.regions.get(key) if by == "id" else self.by_vaddr.get(key)
            if (r is not None and r.kind == "relay" and r.owner == p.id and r.seg in p.segs
                    and r.seg not in self.pending_seg and r not in out):
                out.append(r)
        return out

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
        self.timers.pop(("eof", peer_id), None)
        if p.enclave.state != DONE:
            fx.append(Kill(peer_id))    # the exit status (next event) gives the reason
        self._maybe_reap(fx, p)
        return fx

    def spawned(self, peer_id, pid):
        p = self.peers.get(peer_id)
        if p is not None and p.enclave is not None:
            p.enclave.pid = pid
        return []

    def spawn_failed(self, peer_id, why, exhausted=False):
        """The enclave's process could not be started; ``exhausted``: for want of fds,
        processes or memory (the create is refused with :class:`ResourceExhausted`)."""
        p = self.peers.get(peer_id)
        if p is None or p.enclave is None:
            return []
        p.how = f"could not start: {why}"
        if exhausted and p.enclave.end is None:
            p.enclave.end = (E.ResourceExhausted, f"cannot start enclave "
                                                  f"{p.enclave.name!r}: {why}")
        p.eof = True
        fx: list = []
        self._maybe_reap(fx, p)
        return fx

    def exited(self, peer_id, how, now=0.0):
        """The zygote reaped the enclave process of ``peer_id``; ``how`` describes it."""
        p = self.peers.get(peer_id)
        if p is None or p.enclave is None:
            return []
        p.how = how
        fx: list = []
        if not p.eof:
            # The process is dead, so EOF on its socket follows the last message it sent;
            # wait for it (a grace period) so that an exit still in the socket is not
            # mistaken for a crash.
            self.timers[("eof", peer_id)] = now + self.config.eof_grace
            return fx
        self._maybe_reap(fx, p)
        return fx

    def segment_created(self, seg):
        """The shell created segment ``seg`` (a NewSeg effect): answer its request."""
        pend = self.pending_seg.pop(seg, None)
        r = self.seg_region.get(seg)
        if pend is None or r is None:
            return []
        peer_id, rid, op = pend
        fx: list = []
        if op == "split":
            _split_done(self, fx, r, peer_id, rid)
        elif op == "mmap":
            g, segs = self._grants(peer_id, [r])
            self._send(fx, peer_id, {"op": "r", "rid": rid, "vaddr": r.vaddr, "g": g}, segs)
        else:
            self._send(fx, peer_id, {"op": "r", "rid": rid, "id": r.id, "vaddr": r.vaddr,
                                     "size": r.length})
        return fx

    def segment_failed(self, seg, why):
        """The shell could not create segment ``seg``: undo its region, refuse the request."""
        pend = self.pending_seg.pop(seg, None)
        r = self.seg_region.get(seg)
        if pend is None or r is None:
            return []
        peer_id, rid, _op = pend
        fx: list = []
        if _op == "split":
            _split_undo(self, fx, r, peer_id, rid, why)
            return fx
        r.revoked = True          # no fd exists, so no FreeSeg
        self._free(fx, r)
        self._send(fx, peer_id, _err(E.NoMemory(f"cannot create shared memory: {why}"), rid))
        return fx

    def segment_tampered(self, seg, send: Send):
        """The shell found segment ``seg``, granted in ``send``, resized (a SIGBUS weapon)
        and did not send it.  The peer(s) that held it before this handoff are violators:
        an enclave is killed (who waits on it gets IsolationViolation), a host is cut off.
        The region is freed: it goes to nobody.  Returns ``send`` without that grant (a
        reply becomes an IsolationViolation error) and the rest."""
        fx: list = []
        r = self.seg_region.get(seg)
        dest = send.peer
        msg = dict(send.msg)
        g = [x for x in msg.get("g", ()) if x[0] != seg]
        if r is None:             # freed meanwhile: just leave the grant out
            if g or msg.get("op") != "grant":
                msg["g"] = g
                fx.append(Send(dest, msg, [s for s in send.segs if s != seg]))
            return fx
        if r.prev is not None:
            suspects = {r.prev}        # who held it before this handoff (maybe dest itself)
        else:
            suspects = set(r.mappers) - {dest} or {dest}
        suspects = {s for s in suspects if self._alive(s)}
        why = (f"segment {seg} (region at {r.vaddr:#x}) was resized by a holder: "
               f"isolation violation")
        # the receiver did not get this fd after all
        d = self.peers.get(dest)
        if seg in send.segs and d is not None:
            d.segs.discard(seg)
            r.mappers.discard(dest)
        self._free(fx, r)
        if msg.get("op") == "grant" and not g:
            if d is not None and msg.get("d"):
                d.drops = msg["d"] + d.drops    # they ride on its next message instead
        elif dest not in suspects and self._alive(dest):
            msg["g"] = g
            if msg.get("op") == "r":
                rid = msg.get("rid")
                msg = _err(E.IsolationViolation(why), rid)
                msg["g"] = g
                if "d" in send.msg:
                    msg["d"] = send.msg["d"]
            fx.append(Log(f"peer {dest}: {why}"))
            self._send(fx, dest, msg, [s for s in send.segs if s != seg])
        for s in sorted(suspects):
            q = self.peers.get(s)
            if q is None or not q.alive:
                continue
            if q.kind == HOST:
                fx.append(Log(f"host {s} tampered with segment {seg}; disconnecting it"))
                self._host_gone(fx, q)
            else:
                e = q.enclave
                e.end = (E.IsolationViolation, f"enclave {e.name!r}: {why}; it was killed")
                self._destroy(fx, e)
        return fx

    def isolation_violation(self, peer_id, seg, verify: Verify):
        """Strict mode: the shell found ``peer_id`` still mapping segment ``seg`` before
        performing ``verify.send`` (which it did not send).

        An enclave violator is killed (who waits on it gets IsolationViolation) and the
        Send is held until its process has been reaped (:meth:`_maybe_reap` releases it,
        verified again); a host violator is cut off and the regions it still maps are
        freed (a host cannot be killed: its mapping stays, so those go to nobody)."""
        fx: list = []
        send = self._unsend(verify)
        r = self.seg_region.get(seg)
        where = f" (region at {r.vaddr:#x})" if r is not None else ""
        why = (f"segment {seg}{where} is still mapped by a process that gave it up: "
               f"isolation violation")
        p = self.peers.get(peer_id)
        if p is None:
            # gone meanwhile, its mapping with it: send (verified again)
            self._resend(fx, send, why)
            return fx
        fx.append(Log(f"peer {peer_id}: {why}"))
        if p.kind == HOST:
            for x in list(self.regions.values()):
                if peer_id in x.mappers and x.kind == "relay":
                    x.mappers.discard(peer_id)
                    self._free(fx, x)
            if p.alive:
                self._host_gone(fx, p)
            self._resend(fx, send, why)
            return fx
        # nothing is granted while the violator's process lives
        self.held.setdefault(peer_id, []).append((send, why))
        e = p.enclave
        if e.state != DONE:
            e.end = (E.IsolationViolation, f"enclave {e.name!r}: {why}; it was killed")
            self._destroy(fx, e)
        else:
            fx.append(Kill(peer_id))
        return fx

    def _resend(self, fx, send: Send, why: str | None = None) -> None:
        """Send a held (unsent: :meth:`_unsend`) ``send`` again with only the grants
        still valid (a region that exists and is the receiver's, or shared); with
        ``why``, a reply becomes an IsolationViolation error carrying them.  It is
        verified again (strict ``_send``), and recorded when it goes."""
        dest = send.peer
        d = self.peers.get(dest)
        if d is None or not d.alive:
            return
        msg = dict(send.msg)
        g: list = []
        segs: list = []
        for x in msg.get("g") or ():
            r = self.seg_region.get(x[0])
            if r is None or not (r.kind == "shm" or r.owner == dest):
                continue
            if x[4] == "remap":
                g.append(x)             # a remap grant always carries the fd
                segs.append(r.seg)
            else:
                g1, s1 = self._grants(dest, [r])      # the fd goes if it is not mapped
                g += g1
                segs += s1
        if why is not None and msg.get("op") == "r":
            msg = _err(E.IsolationViolation(why), msg.get("rid"))
        if "g" in send.msg:
            msg["g"] = g
        if msg.get("op") == "grant" and not g:
            return
        self._send(fx, dest, msg, segs)

    def tick(self, now):
        """Handle every deadline that has passed."""
        fx: list = []
        timers = self.timers
        due = sorted(((d, i, k) for i, (k, d) in enumerate(timers.items()) if d <= now),
                     key=lambda t: (t[0], t[1]))
        for _d, _i, k in due:
            if k not in timers:
                continue            # settled by an earlier expiry
            del timers[k]
            if isinstance(k, Frame):
                self._frame_expired(fx, k)
            elif isinstance(k, Enclave):
                if k.state == STARTING:
                    k.end = (E.Timeout, f"enclave {k.name!r} was not ready in time")
                    self._destroy(fx, k)
            else:
                p = self.peers.get(k[1])
                if p is not None and not p.eof:
                    p.eof = True
                    self._maybe_reap(fx, p)
        return fx

    def next_deadline(self):
        return min(self.timers.values()) if self.timers else None

    def shutdown(self):
        """Destroy every enclave and free every region (the monitor is stopping)."""
        fx: list = []
        for p in list(self.peers.values()):
            if p.kind == HOST and p.alive:
                self._host_gone(fx, p)
        for p in list(self.peers.values()):
            if p.kind == ENCLAVE and p.enclave.state != DONE:
                p.enclave.end = p.enclave.end or (
                    E.EnclaveFault, "the monitor is shutting down")
                self._destroy(fx, p.enclave)
        for r in list(self.regions.values()):
            self._free(fx, r)
        self.timers.clear()
        self.held.clear()
        return fx

    # ------------------------------------------------------------------ lifecycle
    def _host_gone(self, fx, p: Peer):
        p.alive = False
        for ep in list(p.enclaves):
            # destroying one instance of a pool that never started ends its siblings too,
            # and one without a process is reaped at once: it may be gone by its turn
            q = self.peers.get(ep)
            if q is None:
                continue
            e = q.enclave
            if e.state != DONE:
                e.end = e.end or (E.UnknownHandle, "its host disconnected")
                self._destroy(fx, e)
        for r in list(self.regions.values()):
            r.mappers.discard(p.id)
            if r.creator == p.id and (r.kind == "shm" or r.owner == p.id):
                self._free(fx, r)
        for h in p.tombs:
            self.tombs.pop(h, None)
        p.tombs.clear()
        fx.append(Close(p.id))
        fx.append(Log(f"host {p.id} disconnected"))
        self.peers.pop(p.id, None)
        p.account.peers.discard(p.id)
        self._drop_account(p.account)

    def _destroy(self, fx, e: Enclave):
        """Kill enclave ``e`` now and settle everything it was part of."""
        self._settle(fx, e)
        p = self.peers[e.peer]
        p.eof = True              # we close its socket: no EOF event will come
        self.timers.pop(("eof", e.peer), None)
        fx.append(Kill(e.peer))
        fx.append(Close(e.peer))
        self._maybe_reap(fx, p)

    def _maybe_reap(self, fx, p: Peer):
        """Finalize an enclave once its socket hit EOF *and* its process was reaped."""
        if not (p.eof and p.how is not None):
            return
        e = p.enclave
        if e.state != DONE:
            e.end = e.end or (E.EnclaveFault, f"enclave {e.name!r}: {p.how}")
            self._settle(fx, e)
        fx.append(Close(p.id))
        if e.eid < len(self.slots) and self.slots[e.eid] is e:
            self.slots[e.eid] = None
            self.gens[e.eid] = e.gen + 1
        host = self.peers.get(e.host)
        if host is not None:
            host.enclaves.discard(p.id)
        self.peers.pop(p.id, None)
        held = self.held.pop(p.id, None)
        if held:
            # the violator's process is gone, its mappings with it: grant now
            for send, why in held:
                self._resend(fx, send, why)

    def _settle(self, fx, e: Enclave, retval=None):
        """Enclave ``e`` is finished or dead: unwind every frame and region it touches
        (``retval``: it ended its run with EAPP_RETURN and this value)."""
        if e.state == DONE:
            return
        p = self.peers[e.peer]
        p.alive = False
        if e.end is None:
            e.end = (E.EnclaveFault, f"enclave {e.name!r} died")
        cls, why = e.end
        was = e.state
        self._set_state(e, DONE)
        self.timers.pop(e, None)
        pool = e.pool
        # the pool ends with its last instance; until then the others serve its queue
        ended: Pool | None = None
        if pool is not None and not pool.live():
            ended = pool
            if self.servers.get(e.name) is pool:
                del self.servers[e.name]
            if self.pools.get(pool.handle) is pool:
                del self.pools[pool.handle]
        if cls is E.IsolationViolation:
            call_exc: E.TvmError = E.IsolationViolation(why)
        else:
            call_exc = E.PeerDied(f"server {e.name!r}: {why}")
        # a create not answered yet is answered with what ended it; an instance that
        # could not start takes the whole pool with it
        doomed: list[Enclave] = []
        if was == STARTING and e.create_rid is not None:
            rid, e.create_rid = e.create_rid, None
            self._send(fx, e.host, _err(cls(why), rid))
        if pool is not None and pool.create_rid is not None and was == STARTING:
            rid, pool.create_rid = pool.create_rid, None
            self._send(fx, e.host, _err(cls(why), rid))
            doomed = pool.live()
        # calls queued on this server never reached it: refuse them
        if ended is not None:
            while ended.queue:
                f = ended.queue.popleft()
                self._unqueue(f)
                if f.kind == "asyn":
                    _drop_asyn(self, fx, f)     # nobody waits: the region was the server's
                else:
                    self._fail_queued(fx, f, call_exc)
        # calls it waits for are withdrawn: a queued one leaves its queue (its loans come
        # back here and are settled below); a running one finishes, and its loans then
        # skip this dead caller on their way back
        for f in list(e.out.values()):
            self.timers.pop(f, None)
            if f.queued:
                self._unqueue(f)
                f.server.queue.remove(f)
                for r in f.loans:
                    self._unlend(r, e.peer)
            f.answered = True
        e.out.clear()
        # the call or run it is serving fails; what it holds on loan goes back
        fi = e.frame_in
        if fi is not None:
            f = fi
            e.frame_in = None
            if f.kind == "run" and retval is not None:
                self._finish_run(fx, f, retval)
            elif f.kind == "run":
                run_cls = cls if cls in _RUN_ERRORS else E.EnclaveFault
                self._finish_run(fx, f, None, run_cls(why))
            else:
                self._finish_call(fx, f, None, None, call_exc)
        # anything else it owns: loans go back, its own regions are freed
        for r in list(self.regions.values()):
            self._unmapped(fx, r, e.peer)
            if r.kind == "relay" and r.owner == e.peer:
                if r.stack:
                    self._give_back(fx, [r], e.peer, None)
                else:
                    self._free(fx, r)
        if e.stopped_by is not None:
            self._stop_ended(fx, e)
        self._bury(e)
        fx.append(Log(f"enclave {e.name!r} (eid {e.eid}) finished: {why}"))
        for m in doomed:
            if m.state != DONE:
                m.end = (cls, f"another instance of {m.name!r} could not start: {why}")
                self._destroy(fx, m)

    def _unmapped(self, fx, r: Region, peer_id):
        """``peer_id`` no longer maps region ``r``; a revoked shm region may now go."""
        r.mappers.discard(peer_id)
        if r.revoked and not r.mappers:
            self._free(fx, r)

    def _give_back(self, fx, loans, holder, expected):
        """Return ``loans`` held by ``holder`` to their lenders.

        Regions going to ``expected`` are returned in a list (the caller puts their grants
        in its reply); regions going to anyone else get an unsolicited ``grant`` message.
        A loan ``holder`` lent on further skips ``holder`` when it comes back.
        """
        if not loans:
            return []
        back: list[Region] = []
        other: dict[int, list[Region]] = {}
        for r in loans:
            if r.id not in self.regions:
                continue
            if r.owner != holder:
                if holder is not None:
                    self._skip_lender(r, holder)
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
            if g:
                self._send(fx, peer_id, {"op": "grant", "g": g}, segs)
        return back

    # ------------------------------------------------------------------ calls
    def _unqueue(self, f):
        f.queued = False
        if not f.full:
            self.timers.pop(f, None)
            f.deadline = None

    def _dispatch(self, fx, f: Frame):
        """Start call ``f`` on its (idle) server."""
        s = f.server
        self._set_state(s, SERVING)
        s.frame_in = f
        for r in f.loans:
            self._take(r, s.peer)
        g, segs = self._grants(s.peer, f.loans) if f.loans else ([], ())
        a = f.arg
        caller = self.peers[f.caller].enclave
        if caller.stopped_by is not None:
            self._stop_member(fx, s, caller.stopped_by)   # the stopped chain grew down
        self._send(fx, s.peer, {"op": "call", "a": [a[0], a[2], a[3]], "c": caller.eid,
                                "g": g}, segs)

    def _next_call(self, fx, s: Enclave):
        """The instance ``s`` is idle: it takes the next call of its pool's queue."""
        q = s.queue
        while q and s.state == IDLE and s.stopped_by is None:
            f = q.popleft()
            self._unqueue(f)
            f.server = s
            if f.kind == "asyn":
                _dispatch_asyn(self, fx, f)
            else:
                self._dispatch(fx, f)

    def _fail_queued(self, fx, f: Frame, exc):
        """A queued call that never reached its server: give the loans back, report."""
        for r in f.loans:
            self._unlend(r, f.caller)
        c = self.peers.get(f.caller)
        self.timers.pop(f, None)
        if c is not None and c.alive:
            c.enclave.out.pop(f.rid, None)
            g, segs = self._grants(f.caller, f.loans)
            msg = _err(exc, f.rid)
            msg["g"] = g
            self._send(fx, f.caller, msg, segs)

    def _frame_expired(self, fx, f: Frame):
        f.deadline = None
        if f.answered:
            return
        if f.kind == "run":
            f.answered = True
            self._send(fx, f.caller, _err(E.Timeout(
                f"enclave {f.server.name!r} still runs past the deadline"
                f"{_stopped_note(f.server)}"), f.rid))
            return
        if f.queued:
            f.queued = False
            f.server.queue.remove(f)
            self._fail_queued(fx, f, E.Timeout(
                f"server {f.server.name!r} stayed busy past the deadline"))
            return
        f.answered = True
        c = self.peers.get(f.caller)
        if c is not None and c.alive:
            c.enclave.out.pop(f.rid, None)
            self._send(fx, f.caller, _err(E.Timeout(
                f"server {f.server.name!r} did not return by the deadline"
                f"{_stopped_note(f.server)}"), f.rid))

    def _finish_call(self, fx, f: Frame, resp: Region | None, resp_val, exc=None):
        """Return loans (and the response region) of call ``f`` and answer its caller."""
        if f.deadline is not None:
            self.timers.pop(f, None)
        c = self.peers.get(f.caller)
        live = not f.answered and c is not None and c.alive
        back = self._give_back(fx, f.loans, f.server.peer, f.caller if live else None) \
            if f.loans else []
        if resp is not None and resp not in f.loans:
            if live:
                self._give(resp, f.server.peer, f.caller)
                back.append(resp)
            else:
                self._free(fx, resp)
        if not live or c is None:
            return
        c.enclave.out.pop(f.rid, None)
        g, segs = self._grants(f.caller, back) if back else ([], ())
        if exc is not None:
            msg = _err(exc, f.rid)
            msg["g"] = g
        else:
            a = f.arg.copy()
            a[1] = resp_val
            if resp is not None:
                a[4], a[5] = resp.vaddr, resp.length
            else:
                a[4], a[5] = 0, 0
            msg = {"op": "r", "rid": f.rid, "a": a, "g": g}
        self._send(fx, f.caller, msg, segs)

    def _finish_run(self, fx, f: Frame, retval, exc=None):
        """The run ``f`` ended: schrodinger regions go back to the host, which is answered
        (unless it had its answer already: a timeout)."""
        if f.deadline is not None:
            self.timers.pop(f, None)
        live = not f.answered and self._alive(f.caller)
        back = self._give_back(fx, f.loans, f.server.peer, f.caller if live else None)
        if not live:
            return
        g, segs = self._grants(f.caller, back)
        if exc is not None:
            msg = _err(exc, f.rid)
            msg["g"] = g
        else:
            msg = {"op": "r", "rid": f.rid, "retval": retval, "g": g}
        self._send(fx, f.caller, msg, segs)

    # ------------------------------------------------------------------ stop / resume
    def _chain(self, root: Enclave) -> list[Enclave]:
        """``root`` and every server running a call of its chain (down its outgoing
        calls that a server has taken, transitively): the thread of control that a stop
        of ``root`` freezes.  Queued calls have no server yet; a server already stopped
        (by a stop of its own) is left to its own root, with what is below it."""
        out = [root]
        todo = [root]
        while todo:
            cur = todo.pop()
            for f in cur.out.values():
                s = f.server
                if not f.queued and s.state != DONE and s.stopped_by is None \
                        and s not in out:
                    out.append(s)
                    todo.append(s)
        return out

    def _stop_member(self, fx, e: Enclave, root: Enclave) -> None:
        """Stop ``e``'s process on behalf of the stop of ``root``."""
        if e.stopped_by is not None or e.state == DONE:
            return
        e.stopped_by = root
        fx.append(Signal(e.peer, "stop"))

    def _cont_member(self, fx, e: Enclave) -> None:
        """Continue ``e``'s process; an idle server takes the calls that queued."""
        e.stopped_by = None
        if e.state == DONE:
            return
        fx.append(Signal(e.peer, "cont"))
        if e.state == IDLE and e.queue:
            self._next_call(fx, e)

    def _stopped_by(self, root: Enclave) -> list[Enclave]:
        return [m for m in self.slots if m is not None and m.stopped_by is root]

    def _stop_ended(self, fx, e: Enclave) -> None:
        """Stopped ``e`` ended (destroyed, died): nobody can resume what its stop holds,
        so that resumes now -- the servers of its chain finish their calls (what they
        return goes to a dead caller: freed, DESIGN.md §4).  A member that ends just
        leaves the stop."""
        root = e.stopped_by
        e.stopped_by = None
        if root is e:
            self._cont_members(fx, self._stopped_by(e))
            fx.append(Log(f"enclave {e.name!r} ended stopped: its chain resumes"))

    def _cont_members(self, fx, members: list[Enclave]) -> None:
        """Continue ``members`` (the whole of one stop), in order.  None is stopped any
        more before the first goes on: an idle server continued first takes the queued
        call of a member continued later, which would otherwise stop it again on behalf
        of a stop that is over."""
        for m in members:
            m.stopped_by = None
        for m in members:
            self._cont_member(fx, m)

    def stop(self, fx, e: Enclave) -> list[int]:
        """Stop ``e`` and the servers running its chain; returns their handles."""
        members = self._chain(e)
        for m in members:
            self._stop_member(fx, m, e)
        return [m.handle for m in members]

    def resume(self, fx, e: Enclave) -> list[int]:
        """Continue everything the stop of ``e`` stopped; returns their handles."""
        members = self._stopped_by(e)
        members.sort(key=lambda m: m is not e)      # the root first
        self._cont_members(fx, members)
        return [m.handle for m in members]

    def report(self, e: Enclave, nonce: int) -> dict:
        """Attestation report of ``e``: its creation-time measurement, ``nonce``, name and
        type, signed with the monitor's Ed25519 key (layout: tvmrt/_attest.py).

        Unlike Penglai, nothing is re-measured and nothing changes: the same enclave
        and nonce give the same signed fields every time (Ed25519 is deterministic, so
        the same signature too)."""
        return self.signer.report(e.measurement, nonce, e.type, e.name)


# ---------------------------------------------------------------------- host ops
def _h_shmget(core, fx, p, msg, rid, nfds, now):
    core._new_region(fx, p, msg["size"], "shm", "shm", rid, "shmget")


def _h_sget(core, fx, p, msg, rid, nfds, now):
    core._new_region(fx, p, msg["size"], "relay", "relay", rid, "sget")


def _h_attach(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmat" else "relay"
    r = core._host_region(p, msg["id"], kind)
    if kind == "relay" and r.owner != p.id:
        raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
    if r.seg in p.segs:
        raise E.BadState(f"region {r.id:#x} is already attached")
    core._send(fx, p.id, {"op": "r", "rid": rid, "vaddr": r.vaddr, "size": r.length,
                          "g": [[r.seg, r.vaddr, r.length, 1, core._kind(r)]]}, [r.seg])


def _h_detach(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmdt" else "relay"
    r = core._host_region(p, msg["id"], kind)
    if r.seg not in p.segs:
        raise E.BadState(f"region {r.id:#x} is not attached")
    p.segs.discard(r.seg)
    if kind == "shm" or core.config.isolation != "strict":
        r.mappers.discard(p.id)
    # (strict: a host that detached a schrodinger region stays one of its mappers, a
    # past holder checked at the region's grants like any other: it may keep a mapping)
    core._send(fx, p.id, {"op": "r", "rid": rid, "d": [r.seg]})


def _h_ctl(core, fx, p, msg, rid, nfds, now):
    kind = "shm" if msg["op"] == "shmctl" else "relay"
    r = core._host_region(p, msg["id"], kind)
    if kind == "relay":
        if r.owner != p.id:
            raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
        if r.seg in p.segs:
            raise E.BadState(f"schrodinger region {r.id:#x} is still attached: dt first")
        core._free(fx, r)
    else:
        # Revoke the id and close the monitor's fd.  Enclaves that map the memory keep
        # it (the kernel frees it with the last mapping: no use-after-free, unlike
        # Penglai); its address range stays taken until they are gone.
        if r.seg in p.segs:
            raise E.BadState(f"shared memory {r.id:#x} is still attached: shmdt first")
        fx.append(FreeSeg(r.seg))
        r.revoked = True
        if not r.mappers:
            core._free(fx, r)
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _h_create(core, fx, p, msg, rid, nfds, now):
    cfg = core.config
    name = msg["name"]
    etype = msg["type"]
    code = msg["code"]
    path = msg.get("path", "<eapp>")
    window = msg.get("shm")
    timeout = _timeout(msg, cfg.create_timeout)
    if etype == SERVER and name in core.servers:
        raise E.NameInUse(f"a server named {name!r} exists")
    instances = msg.get("instances", 1)
    if instances > 1 and etype != SERVER:
        raise E.InvalidArgument("only a server enclave has instances")
    mine = core._host_enclaves(p)
    if mine + instances > cfg.max_enclaves:
        raise E.QuotaExceeded(f"this host process has {mine} enclaves "
                              f"(at most {cfg.max_enclaves})")
    if len(core.slots) - core.slots.count(None) + instances > cfg.max_enclaves_total:
        raise E.QuotaExceeded("the monitor has too many enclaves")
    shm = None
    if window is not None:
        sid, off, size = window
        r = core._host_region(p, sid, "shm")
        if off % core.page or size % core.page:
            raise E.Unaligned("shm offset and size must be page multiples")
        if size == 0 or off + size > r.length:
            raise E.BadSize(f"shm window {off:#x}+{size:#x} outside region of {r.length:#x}")
        shm = (r, off, size)
    allow = _callers(msg, etype)
    pool = None
    if etype == SERVER:
        # registered now: calls queue until an instance is ready
        pool = core.servers[name] = Pool(name, p.id, p.account if allow is None else allow)
        pool.create_rid = rid
    measurement = measure(etype, name, code)
    for i in range(instances):
        last = _start_enclave(core, fx, p, name, etype, code, path, measurement, shm, pool,
                              i, nfds, now + timeout)
    if pool is None:
        last.create_rid = rid
    else:
        pool.handle = pool.members[0].handle
        core.pools[pool.handle] = pool


def _callers(msg, etype):
    """The ``callers`` of a create: who may acquire and call the server (see
    :attr:`Pool.allow`): absent or None, enclaves of the same host process; ``"*"``, any
    enclave; a list of enclave names and 32-byte measurements (schema: ``callers``)."""
    c = msg.get("callers")
    if c is None:
        return None
    if etype != SERVER:
        raise E.InvalidArgument("only a server has callers")
    return True if c == "*" else frozenset(c)


def _start_enclave(core, fx, p, name, etype, code, path, measurement, shm, pool, index,
                   nfds, deadline):
    """One enclave process of a create (one instance of a server pool)."""
    # lowest free slot, as Penglai's monitor does
    try:
        eid = core.slots.index(None)
    except ValueError:
        eid = len(core.slots)
        core.slots.append(None)
        core.gens.append(0)
    ep = core._new_peer(ENCLAVE)
    e = Enclave(ep.id, eid, core.gens[eid], name, etype, p.id, measurement,
                core.config.sandbox)
    e.hostacct = p.account
    ep.enclave = e
    core.slots[eid] = e
    p.enclaves.add(ep.id)
    spec = {"eid": eid, "handle": e.handle, "name": name, "type": etype, "code": code,
            "path": path}
    if core.config.isolation == "strict":
        spec["maps"] = 1        # pass the monitor an fd of /proc/self/maps before the sandbox
    if pool is not None:
        e.pool = pool
        pool.members.append(e)
        spec["instance"] = index
    seg = None
    if shm is not None:
        r, off, size = shm
        spec["shm"] = [r.vaddr + off, size, off]
        e.shm = (r.vaddr + off, size)
        seg = r.seg
        r.mappers.add(ep.id)
        ep.segs.add(r.seg)
    core.timers[e] = deadline
    fx.append(Spawn(ep.id, spec, seg, "message" if nfds == 2 else "null"))
    return e


def _own_enclave(core, p, msg):
    e = core._enclave(msg["handle"], p.id)
    if e.host != p.id:
        raise E.NotPermitted(f"enclave {e.name!r} belongs to another host")
    return e


def _h_run(core, fx, p, msg, rid, nfds, now):
    # refused, the host gets the region of ``mem`` back (Core._revoked)
    e = _own_enclave(core, p, msg)
    if e.type != NORMAL:
        raise E.BadState("a server enclave is entered by call_enclave, not run")
    if e.state != CREATED:
        raise E.BadState(f"enclave {e.name!r} is {e.state}, not ready to run")
    if e.stopped_by is not None:
        raise E.Stopped(f"enclave {e.name!r} is stopped: resume it first")
    window = msg.get("mem")
    timeout = _timeout(msg, None)
    loans = []
    a13 = a14 = 0
    if window is not None:
        sid, off, size = window
        r = core._host_region(p, sid, "relay")
        if r.owner != p.id:
            raise E.RegionLoaned(f"schrodinger region {r.id:#x} is held by an enclave")
        if off % core.page or size % core.page:
            raise E.Unaligned("schrodinger offset and size must be page multiples")
        if size == 0 or off + size > r.length:
            raise E.BadSize(f"window {off:#x}+{size:#x} outside region of {r.length:#x}")
        loans.append(r)
        a13, a14 = r.vaddr + off, size
    a10, a11 = e.shm if e.shm else (0, 0)
    f = Frame("run", p.id, e, loans, [a10, a11, 0, a13, a14], rid)
    for r in loans:
        core._lend(r, p.id, e.peer)
    if timeout is not None:
        f.deadline = now + timeout
        f.full = True
        core.timers[f] = f.deadline
    core._set_state(e, RUNNING)
    e.frame_in = f
    g, segs = core._grants(e.peer, loans)
    core._send(fx, e.peer, {"op": "start", "args": f.arg, "g": g}, segs)


def _own_pool(core, p, msg):
    """The server pool named by the request's handle, if it is one (None otherwise)."""
    h = msg.get("handle")
    pool = core.pools.get(h) if type(h) is int else None
    if pool is not None and pool.host != p.id:
        raise E.NotPermitted(f"server {pool.name!r} belongs to another host")
    return pool


def _h_destroy(core, fx, p, msg, rid, nfds, now):
    pool = _own_pool(core, p, msg)
    victims = pool.live() if pool is not None else [_own_enclave(core, p, msg)]
    for e in victims:                       # a pool's handle: every instance
        e.end = (E.UnknownHandle, f"enclave {e.name!r} was destroyed by its host")
        core._destroy(fx, e)
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _h_attest(core, fx, p, msg, rid, nfds, now):
    pool = _own_pool(core, p, msg)
    e = pool.live()[0] if pool is not None else _own_enclave(core, p, msg)
    nonce = msg["nonce"]
    rep = core.report(e, nonce)
    core._send(fx, p.id, {"op": "r", "rid": rid, "report": rep})


def _stopped_note(e: Enclave) -> str:
    """What a Timeout says about a server or enclave that is stopped (deadlines run on
    while an enclave is stopped: its callers are not held beyond them)."""
    return " (it is stopped)" if e.stopped_by is not None else ""


def _targets(core, p, msg) -> list[Enclave]:
    """The enclaves a host's stop/resume names: an enclave, or every live instance of a
    server pool's handle."""
    pool = _own_pool(core, p, msg)
    return pool.live() if pool is not None else [_own_enclave(core, p, msg)]


def _h_stop(core, fx, p, msg, rid, nfds, now):
    """``stop``: SIGSTOP the enclave and the servers now running its call chain (see
    Core._chain); everything is checked before anything is stopped."""
    victims = _targets(core, p, msg)
    for e in victims:
        if e.stopped_by is not None:
            by = "" if e.stopped_by is e else \
                f" (with the chain of enclave {e.stopped_by.name!r})"
            raise E.Stopped(f"enclave {e.name!r} is stopped already{by}")
        if e.state not in STOPPABLE:
            raise E.BadState(f"enclave {e.name!r} is {e.state}: it cannot be stopped")
    stopped: list[int] = []
    for e in victims:
        stopped += core.stop(fx, e)
    core._send(fx, p.id, {"op": "r", "rid": rid, "stopped": stopped})


def _h_resume(core, fx, p, msg, rid, nfds, now):
    """``resume``: SIGCONT what the stop of this enclave stopped.  NotStopped if it is not
    stopped, or stopped only as a server of another enclave's chain (resume that one)."""
    victims = _targets(core, p, msg)
    for e in victims:
        if e.stopped_by is None:
            raise E.NotStopped(f"enclave {e.name!r} is not stopped (it is {e.state})")
        if e.stopped_by is not e:
            raise E.NotStopped(f"enclave {e.name!r} was stopped with the call chain of "
                               f"enclave {e.stopped_by.name!r} "
                               f"(handle {e.stopped_by.handle:#x}): resume that one")
    resumed: list[int] = []
    for e in victims:
        resumed += core.resume(fx, e)
    core._send(fx, p.id, {"op": "r", "rid": rid, "resumed": resumed})


def _h_ps(core, fx, p, msg, rid, nfds, now):
    encl = [{"eid": e.eid, "handle": e.handle, "name": e.name, "type": e.type,
             "state": STOPPED if e.stopped_by is not None else e.state,
             "was": e.state,
             "stopped_by": e.stopped_by.handle if e.stopped_by is not None else None,
             "host": e.host, "pid": e.pid, "peer": e.peer,
             "sandbox": e.sandbox,
             "pool": e.pool.handle if e.pool is not None else None,
             "instance": e.pool.members.index(e) if e.pool is not None else None}
            for e in core.slots if e is not None]
    regs = [{"id": r.id, "seg": r.seg, "kind": r.kind, "vaddr": r.vaddr, "size": r.length,
             "owner": r.owner, "lenders": list(r.stack)} for r in core.regions.values()]
    reply = {"op": "r", "rid": rid, "enclaves": encl, "regions": regs,
             "sandbox": core.config.sandbox,
             "hosts": sum(1 for q in core.peers.values() if q.kind == HOST),
             "public_key": core.signer.public_key}
    fx.append(Stats(reply))           # the shell adds the monitor's own pid, fds, RSS
    core._send(fx, p.id, reply)


_HOST_OPS = {
    "shmget": _h_shmget, "shmat": _h_attach, "shmdt": _h_detach, "shmctl": _h_ctl,
    "sget": _h_sget, "sat": _h_attach, "sdt": _h_detach, "sctl": _h_ctl,
    "create": _h_create, "run": _h_run, "destroy": _h_destroy, "attest": _h_attest,
    "ps": _h_ps, "stop": _h_stop, "resume": _h_resume,
}


# ---------------------------------------------------------------------- enclave requests
def _e_mmap(core, fx, p, e, msg, rid, now):
    core._new_region(fx, p, msg["size"], "relay", "mmap", rid, "mmap")


def _e_unmap(core, fx, p, e, msg, rid, now):
    vaddr = msg["vaddr"]
    size = msg["size"]
    r = core.by_vaddr.get(vaddr)
    if r is None or r.kind != "relay" or r.owner != p.id:
        raise E.NotOwned(f"no region at {vaddr:#x} owned by this enclave")
    if r.stack:
        raise E.RegionLoaned(f"region {vaddr:#x} is on loan to this enclave")
    if size != r.length:
        raise E.BadSize(f"unmap size {size:#x} != region size {r.length:#x}")
    core._free(fx, r)
    core._send(fx, p.id, {"op": "r", "rid": rid})


def _server_for(core, name, e) -> Pool:
    """The server ``name`` as enclave ``e`` may see it (acquire, asyn call): one it may
    not call is, to the letter, one that does not exist (NoSuchServer)."""
    pool = core.servers.get(name)
    if pool is None or not pool.may_call(e):
        raise E.NoSuchServer(f"no server named {name!r}")
    return pool


def _e_acquire(core, fx, p, e, msg, rid, now):
    pool = _server_for(core, msg["name"], e)
    core._send(fx, p.id, {"op": "r", "rid": rid, "handle": pool.handle})


def _e_call(core, fx, p, e, msg, rid, now):
    # (schema-checked; refused, the caller gets its request region back: Core._revoked)
    a = msg["a"]
    nb = msg.get("nb", False)
    timeout = msg.get("timeout")
    if e.state not in (RUNNING, SERVING):
        raise E.BadState(f"enclave is {e.state}; only a running enclave may call")
    if rid in e.out:
        # answered without a rid: a reply naming it would reach the first call's waiter
        dup = E.LocalProtocolError(f"rid {rid} is already in use by a call")
        dup.norid = True        # type: ignore[attr-defined]
        raise dup
    handle = msg["handle"]
    pool = core.pools.get(handle)
    if pool is None:
        s = core._enclave(handle)           # a finished server's tombstone, or unknown
        if s.type != SERVER or s.pool is None:
            raise E.UnknownHandle(f"enclave {s.name!r} is not a server")
        pool = s.pool                       # called by one instance's own handle
    # (the usual case, a caller of the server's own host process, is one test)
    if pool.allow is not e.hostacct and not pool.may_call(e):
        raise E.UnknownHandle(f"no live enclave {handle:#x}")    # as if none
    members = pool.members
    # cycle: an instance is the caller itself, or waits (down all its outgoing calls,
    # running or queued) for the caller -- which covers the caller's own chain
    for m in members:
        if m is e or (m.out and core._waits_for(m, e)):
            raise E.CallCycle(f"server {pool.name!r} is already on the call chain")
    req_vaddr, req_size = a[2], a[3]
    loans = []
    if req_vaddr:
        if req_vaddr % core.page:
            raise E.Unaligned(f"req_vaddr {req_vaddr:#x} is not page aligned")
        if req_size == 0 or req_size % core.page:
            raise E.BadSize(f"req_size {req_size:#x} must be a non-zero page multiple")
        r = core.by_vaddr.get(req_vaddr)
        if r is None or r.kind != "relay" or r.owner != p.id:
            raise E.NotOwned(f"no region at {req_vaddr:#x} owned by the caller")
        if req_size != r.length:
            raise E.BadSize(f"req_size {req_size:#x} must cover the whole region "
                            f"({r.length:#x})")
        loans.append(r)
    free = None                             # an idle instance, when nobody queues
    if not pool.queue:
        for m in members:
            if m.state == IDLE and m.stopped_by is None:
                free = m
                break
    if nb and free is None:
        raise E.ServerBusy(f"server {pool.name!r} is busy")
    cfg = core.config
    if len(e.out) >= cfg.max_calls_out:
        raise E.QuotaExceeded(f"this enclave has {len(e.out)} calls in flight "
                              f"(at most {cfg.max_calls_out})")
    if free is None and len(pool.queue) >= cfg.max_queue:
        raise E.QuotaExceeded(f"server {pool.name!r} has {len(pool.queue)} callers "
                              f"queued (at most {cfg.max_queue})")
    # queued, a call names the instance it would have had (any live one); the instance
    # that takes it replaces that (``_next_call``)
    f = Frame("call", p.id, free if free is not None else pool.live()[0], loans, a, rid)
    e.out[rid] = f
    for r in loans:
        core._lend(r, p.id, None)         # in escrow until the server takes the call
    if timeout is not None:
        f.deadline = now + timeout
        f.full = True
        core.timers[f] = f.deadline
    if free is not None:
        core._dispatch(fx, f)
        return
    if f.deadline is None:
        f.deadline = now + core.config.queue_timeout
        core.timers[f] = f.deadline
    f.queued = True
    pool.queue.append(f)


def _e_report(core, fx, p, e, msg, rid, now):
    nonce = msg["nonce"]
    name = msg.get("name")
    if name is None:
        target = e
    else:
        name = msg["name"]
        pool = core.servers.get(name)
        if pool is None:
            raise E.NoSuchServer(f"no server named {name!r}")
        target = pool.live()[0]             # every instance has the same measurement
    core._send(fx, p.id, {"op": "r", "rid": rid, "report": core.report(target, nonce)})


def _e_key(core, fx, p, e, msg, rid, now):
    """``get_key``: a key of ``size`` bytes for this enclave's measurement.  Penglai's
    ENCLAVE_KEY and STORAGE_KEY are distinct keys here (equal there), and its
    ATTEST_KEY (2), which "succeeds" there without writing anything, is refused."""
    ktype = msg["type"]
    if ktype not in (ENCLAVE_KEY, STORAGE_KEY):
        raise E.InvalidArgument(f"key type must be 0 (ENCLAVE_KEY) or 1 (STORAGE_KEY), "
                                f"not {ktype}")
    size = msg["size"]
    if not 1 <= size <= KEY_MAX:
        raise E.BadSize(f"key size must be 1 .. {KEY_MAX} bytes, not {size}")
    key = core.signer.derive_key(e.measurement, ktype, size)
    core._send(fx, p.id, {"op": "r", "rid": rid, "key": key})


_ENCLAVE_OPS = {
    "mmap": _e_mmap, "unmap": _e_unmap, "acquire": _e_acquire, "call": _e_call,
    "report": _e_report, "key": _e_key,
}


# ---------------------------------------------------------------------- enclave notifications
def _n_ready(core, fx, p, e, msg, now):
    if e.state != STARTING:
        raise E.BadState(f"enclave {e.name!r} is {e.state}: ready only once, at start")
    core.timers.pop(e, None)
    core._set_state(e, IDLE if e.type == SERVER else CREATED)
    pool = e.pool
    if pool is None:
        rid, e.create_rid = e.create_rid, None
        core._send(fx, e.host, {"op": "r", "rid": rid, "eid": e.eid, "handle": e.handle,
                                "measurement": e.measurement})
        return
    if pool.create_rid is not None and all(m.state != STARTING for m in pool.members):
        # the create is answered once every instance is ready
        rid, pool.create_rid = pool.create_rid, None
        first = pool.members[0]
        core._send(fx, e.host, {"op": "r", "rid": rid, "eid": first.eid,
                                "handle": pool.handle, "measurement": e.measurement,
                                "instances": len(pool.members)})
    core._next_call(fx, e)


def _n_ret(core, fx, p, e, msg, now):
    f = e.frame_in
    if e.type != SERVER or f is None or e.state != SERVING:
        raise E.BadState("SERVER_RETURN outside a call")
    if e.out:
        raise E.BadState("SERVER_RETURN while waiting for a nested call")
    a = msg["a"]
    resp_vaddr = a[4]
    resp = None
    bad = None
    if resp_vaddr:
        r = core.by_vaddr.get(resp_vaddr)
        if r is None or r.kind != "relay" or r.owner != p.id or (
                r.stack and r not in f.loans):
            bad = E.BadReturn(f"server {e.name!r} returned resp_vaddr {resp_vaddr:#x} "
                              f"that it does not own")
        else:
            resp = r
    e.frame_in = None
    core._set_state(e, IDLE)
    if bad is not None:
        core._finish_call(fx, f, None, None, bad)
        core._send(fx, p.id, _err(bad))
    else:
        core._finish_call(fx, f, resp, a[1])
    if e.queue:
        core._next_call(fx, e)


def _n_exit(core, fx, p, e, msg, now):
    if e.type != NORMAL or e.state != RUNNING:
        raise E.BadState("EAPP_RETURN outside a run")
    v = msg["v"]
    e.end = (E.BadState, f"enclave {e.name!r} has exited with value {v}")
    core._settle(fx, e, v)      # its outstanding calls are withdrawn, then the run ends
    fx.append(Kill(e.peer))


def _n_fault(core, fx, p, e, msg, now):
    why = msg.get("why", "fault")
    c = msg.get("c")
    cls = FAULT_CLASSES.get(c, E.EnclaveFault) if type(c) is int else E.EnclaveFault
    f = e.frame_in
    if e.type == SERVER and f is not None and not e.out:
        # the handler raised: the server survives, the caller gets the reason
        e.frame_in = None
        core._set_state(e, IDLE)
        core._finish_call(fx, f, None, None, cls(f"server {e.name!r}: {why}"))
        core._next_call(fx, e)
        return
    e.end = (cls, f"enclave {e.name!r}: {why}")
    core._settle(fx, e)
    fx.append(Kill(e.peer))


_ENCLAVE_NOTES = {"ready": _n_ready, "ret": _n_ret, "exit": _n_exit, "fault": _n_fault}


# ---------------------------------------------------------------------- relay pages, the rest


def _e_return_relay(core, fx, p, e, msg, rid, now):
    """``eapp_return_relay_page``: the running enclave hands its schrodinger region(s)
    back to the host mid-run.  The host's ``run`` is answered ``relay: 1`` (Penglai's
    PLenclave_run returning 1) with the regions granted back; this request stays
    unanswered until the host's ``rerun`` lends them again at the same address (or the
    enclave ends).  The runtime revoked the regions it sends (``v``: their vaddrs)."""
    f = e.frame_in
    v = msg["v"]
    # refused, the regions of ``v`` it holds go back to it (Core._revoked)
    if e.type != NORMAL or e.state != RUNNING or f is None or f.kind != "run":
        raise E.BadState("eapp_return_relay_page outside a run")
    if f.paused is not None:
        raise E.BadState("the relay page was returned already")
    if e.out:
        raise E.BadState("eapp_return_relay_page while a call is in flight")
    if sorted(v) != sorted(r.vaddr for r in f.loans):
        raise E.InvalidArgument("'v' must list the run's relay regions")
    if any(r.owner != p.id or r.seg not in p.segs for r in f.loans):
        raise E.NotOwned("a relay region of the run is not held by this enclave")
    for r in f.loans:
        core._return_to_lender(fx, r)       # the host (a dead host's enclave is dead)
    f.paused = rid
    if f.deadline is not None:
        core.timers.pop(f, None)
        f.deadline = None
    g, segs = core._grants(f.caller, f.loans)
    if f.answered:                          # the host's run timed out: just the pages
        if g:
            core._send(fx, f.caller, {"op": "grant", "g": g}, segs)
    else:
        f.answered = True
        core._send(fx, f.caller, {"op": "r", "rid": f.rid, "retval": 0, "relay": 1,
                                  "g": g}, segs)


def _h_rerun(core, fx, p, msg, rid, nfds, now):
    """``PLenclave_set_rerun_arg(1)`` + ``PLenclave_run``: continue an enclave that
    returned its relay page.  The same regions are lent to it again at the same
    addresses (the host's client revoked the ones it maps before sending); its
    ``eapp_return_relay_page`` returns 0.  Answered like ``run``."""
    # ``mem``: the id of the region the client revoked for this request, given back
    # on any refusal (Core._revoked; the enclave's frame names the regions that move).
    # ``reason`` is RERUN_RELAY_PAGE, the only one the schema admits.
    e = _own_enclave(core, p, msg)
    f = e.frame_in
    timeout = _timeout(msg, None)
    if f is None or f.kind != "run" or f.paused is None:
        raise E.BadState(f"enclave {e.name!r} is {e.state} and has not returned its "
                         f"relay page: nothing to rerun")
    for r in f.loans:
        if r.id not in core.regions:
            raise E.UnknownId(f"schrodinger region {r.id:#x} was removed")
        if r.owner != p.id or r.stack:
            raise E.RegionLoaned(f"schrodinger region {r.id:#x} is not the host's")
    erid, f.paused = f.paused, None
    f.rid = rid
    f.answered = False
    if timeout is not None:
        f.deadline = now + timeout
        f.full = True
        core.timers[f] = f.deadline
    for r in f.loans:
        core._lend(r, p.id, e.peer)
    g, segs = core._grants(e.peer, f.loans)
    core._send(fx, e.peer, {"op": "r", "rid": erid, "g": g}, segs)


def _e_asyn(core, fx, p, e, msg, rid, now):
    """``asyn_enclave_call(name, arg)``: give the caller's whole region ``vaddr``
    (``size`` bytes; or none: vaddr 0) to the server ``name`` for good, and deliver
    ``arg`` to it like a call whose return goes nowhere.  Answered at once: 0, or the
    error (no such server, its queue full, a region not owned outright).  From then on
    the region is the server's: queued while the server is busy (FIFO with calls,
    bounded by ``max_queue``), freed if the server ends before or after taking it."""
    # refused, the region of ``vaddr`` goes back to the caller (Core._revoked)
    if e.state not in (RUNNING, SERVING):
        raise E.BadState(f"enclave is {e.state}; only a running enclave may call")
    name = msg["name"]
    arg = msg["arg"]
    vaddr = msg["vaddr"]
    size = msg["size"]
    pool = _server_for(core, name, e)
    if any(m is e for m in pool.members):
        raise E.CallCycle(f"server {name!r} is this enclave")
    regs = []
    if vaddr:
        if vaddr % core.page:
            raise E.Unaligned(f"req_vaddr {vaddr:#x} is not page aligned")
        r = core.by_vaddr.get(vaddr)
        if r is None or r.kind != "relay" or r.owner != p.id:
            raise E.NotOwned(f"no region at {vaddr:#x} owned by the caller")
        if r.stack:
            raise E.RegionLoaned(f"region {vaddr:#x} is on loan to this enclave: "
                                 f"only a region it owns may be given away")
        if size != r.length:
            raise E.BadSize(f"req_size {size:#x} must cover the whole region "
                            f"({r.length:#x})")
        regs.append(r)
    free = None
    if not pool.queue:
        for m in pool.members:
            if m.state == IDLE:
                free = m
                break
    if free is None and len(pool.queue) >= core.config.max_queue:
        raise E.QuotaExceeded(f"server {name!r} has {len(pool.queue)} callers "
                              f"queued (at most {core.config.max_queue})")
    f = Frame("asyn", p.id, free if free is not None else pool.live()[0], regs,
              [arg, 0, vaddr, size, 0, 0], None)
    f.answered = True               # nobody waits for its return
    f.paused = e.eid                # the sender's eid, for get_caller_id (it may be gone)
    for r in regs:
        r.prev = p.id
        r.owner = None              # in escrow, with no lender: it never goes back
    core._send(fx, p.id, {"op": "r", "rid": rid})
    if free is not None:
        _dispatch_asyn(core, fx, f)
    else:
        f.queued = True
        pool.queue.append(f)


def _dispatch_asyn(core, fx, f: Frame) -> None:
    """Start the asynchronous call ``f`` on its idle server: its region is the
    server's now (given, not lent: nothing goes back at the return)."""
    s = f.server
    core._set_state(s, SERVING)
    s.frame_in = f
    regs, f.loans = f.loans, []
    for r in regs:
        r.owner = s.peer
    g, segs = core._grants(s.peer, regs)
    a = f.arg
    core._send(fx, s.peer, {"op": "acall", "a": [a[0], a[2], a[3]], "c": f.paused,
                            "g": g}, segs)


def _drop_asyn(core, fx, f: Frame) -> None:
    """A queued asynchronous call whose server ended: its region is freed."""
    for r in f.loans:
        core._free(fx, r)
    f.loans = []


def _e_split(core, fx, p, e, msg, rid, now):
    """``split_mem_region(addr, size, split_at)``: the region at ``addr`` (``size``
    bytes, the whole region, owned outright by this enclave) becomes two regions,
    ``[addr, split_at)`` and ``[split_at, addr+size)``, each with its own fate (loan,
    asyn, unmap).  Both stay in the one segment file: the second half gets a segment
    number of its own (the shell dups the fd: ``SplitSeg``) and its offset in the file
    (``Region.off``), so every grant, revoke and drop stays per region.  Answered when
    the fd exists (``segment_created``) with ``split``: ``[seg1, len1, seg2, len2]``;
    a failed dup undoes the split (``segment_failed``)."""
    addr = msg["vaddr"]
    size = msg["size"]
    at = msg["at"]
    if core.config.isolation == "strict":
        # the two halves share one file: strict mode's check (no other process maps the
        # segment's file) would take the other half's holder for a violator
        raise E.NotPermitted("split_mem_region is not available in strict isolation mode")
    if e.state not in (RUNNING, SERVING):
        raise E.BadState(f"enclave is {e.state}; only a running enclave may split")
    r = core.by_vaddr.get(addr)
    if r is None or r.kind != "relay" or r.owner != p.id or r.seg in core.pending_seg:
        raise E.NotOwned(f"no region at {addr:#x} owned by this enclave")
    if r.stack:
        raise E.RegionLoaned(f"region {addr:#x} is on loan to this enclave: only a "
                             f"region it owns may be split")
    if size != r.length:
        raise E.BadSize(f"size {size:#x} must be the whole region ({r.length:#x})")
    if at % core.page:
        raise E.Unaligned(f"split address {at:#x} is not page aligned")
    if not addr < at < addr + size:
        raise E.BadSize(f"split address {at:#x} is not inside the region "
                        f"({addr:#x} .. {addr + size:#x}): each half needs a page")
    a = r.account
    if a is not None and a.regions + 1 > core.config.max_regions:
        raise E.QuotaExceeded(f"quota: {a.regions} regions in use "
                              f"(at most {core.config.max_regions})")
    file_size = core.fsize.get(r.seg, r.length)     # never split: the file is r
    h = Region(core._next_id, core._next_seg, at, addr + size - at, "relay", r.arena,
               r.creator)
    core._next_id += 1
    core._next_seg += 1
    h.off = r.off + (at - addr)
    h.owner = p.id
    h.prev = r.prev
    r.length = at - addr
    core.regions[h.id] = h
    core.by_vaddr[at] = h
    core.seg_region[h.seg] = h
    if a is not None:
        a.regions += 1                  # the bytes stay the same, in two regions
        h.account = a
    h.mappers = {p.id}
    p.segs.add(h.seg)
    core.fsize[r.seg] = core.fsize[h.seg] = file_size
    core.split_from[h.seg] = r
    core.pending_seg[h.seg] = (p.id, rid, "split")
    fx.append(SplitSeg(h.seg, r.seg, file_size))


def _split_done(core, fx, h: Region, peer_id, rid) -> None:
    """The second half's fd exists: answer the split."""
    first = core.split_from.pop(h.seg)
    # former holders keep a PROT_NONE mapping of the whole old range: they unmap it
    # (a later grant of either half brings an fd); the owner re-keys its own
    for m in first.mappers:
        q = core.peers.get(m)
        if m != peer_id and q is not None and q.alive:
            q.segs.discard(first.seg)
            q.drops.append(first.seg)
    first.mappers = {peer_id}
    core._send(fx, peer_id, {"op": "r", "rid": rid,
                             "split": [first.seg, first.length, h.seg, h.length]})


def _split_undo(core, fx, h: Region, peer_id, rid, why) -> None:
    """The shell could not dup the fd: the two halves are one region again (the
    former holders' mappings are gone either way; they get fds when granted)."""
    first = core.split_from.pop(h.seg)
    first.length += h.length
    core.fsize.pop(h.seg, None)      # first's entry stays right: the file's size
    core.regions.pop(h.id, None)
    core.by_vaddr.pop(h.vaddr, None)
    core.seg_region.pop(h.seg, None)
    p = core.peers.get(peer_id)
    if p is not None:
        p.segs.discard(h.seg)
    if h.account is not None:
        h.account.regions -= 1
        h.account = None
    core._send(fx, peer_id, _err(E.ResourceExhausted(f"cannot split: {why}"), rid))


_HOST_OPS["rerun"] = _h_rerun
_ENCLAVE_OPS["split"] = _e_split
_ENCLAVE_OPS["rrp"] = _e_return_relay
_ENCLAVE_OPS["asyn"] = _e_asyn
