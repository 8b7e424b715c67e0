"""Drive a :class:`tvmrt.monitor.core.Core` the way the I/O shell does, checking every effect.

The :class:`Driver` plays the daemon and every peer process at once, with no sockets and no
processes.  It keeps what the shell and the peers would know:

* the live segments (from ``NewSeg`` / ``FreeSeg``), each freed at most once; a ``NewSeg`` is
  answered at once with ``segment_created`` (or ``segment_failed`` when told to fail);
* which segments each peer's process maps (grants with an fd add one, ``"d"`` drops remove
  one), so that a grant carries an fd exactly when the peer does not map the segment yet;
* which peer a relay segment was last granted to (its creator before any grant);
* sockets (no ``Send`` to a peer after the core closed it, or to a host that left);
* an inbox per peer (without the immediate replies to its own requests: those are in
  :attr:`Driver.last_reply`), and reply accounting (protocol v2): every request carries a
  rid and gets exactly one reply naming it; a host's ``create`` and ``run`` and an enclave's
  ``call`` may get theirs later; nothing is answered twice; a rid-less error only answers a
  request without a valid rid or refuses a notification, at once.

Spawned enclaves say ``ready`` at once unless :attr:`Driver.auto_ready` is off.  Segments in
:attr:`Driver.tamper` are "resized" when next granted: the driver reports
``segment_tampered`` instead of sending, as the daemon does.

Strict mode (``Config.isolation == "strict"``): relay grants are kind ``"remap"`` and
always carry the fd; a ``Verify`` is answered like the shell does: a check of a (peer,
segment) in :attr:`Driver.cheat` (a process that keeps a mapping of a segment it gave
up) is reported with ``isolation_violation``, else the Send is performed.  The
invariant checked at every Send: no relay segment is granted while a process that
cheated on it still lives (nothing is granted until the violator has exited), and a
Verify names every live holder of the segment the core knows of (its receiver too).
The core's record of what each process maps (``Peer.segs``, less its pending drops)
is what that process has received, exactly, in both modes: a Send held until a
process is reaped, or stopped by a Verify, is not counted.

Every violation raises :class:`Violation` (an AssertionError) at the effect that shows it.
:meth:`Driver.check` verifies the invariants of the core's state between events, and
:meth:`Driver.finish` disconnects every host, reports every exit and checks that nothing is
left behind.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from tvmrt.monitor import core as C
from tvmrt.monitor.effects import (
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

REPLY_OPS = ("r", "e")
NOTES = ("ready", "ret", "exit", "fault")


class Violation(AssertionError):
    pass


def _assert(cond, what):
    if not cond:
        raise Violation(what)


def arena_of(core, vaddr):
    for name, a in core.arenas.items():
        if a.base <= vaddr < a.base + a.size:
            return name
    return None


def _frame(f):
    if f is None:
        return None
    return (f.kind, f.caller, f.server.peer, tuple(r.id for r in f.loans), tuple(f.arg), f.rid,
            f.deadline, f.full, f.queued, f.answered)


def _timer_key(k):
    if isinstance(k, C.Frame):
        return ("frame", _frame(k))
    if isinstance(k, C.Enclave):
        return ("create", k.peer)
    return tuple(k)


def snapshot(core):
    """Everything the core knows, as comparable values (pending unmaps left out: an error
    reply may legitimately carry them; id counters too: a refused request may use one)."""
    regs = {i: (r.seg, r.vaddr, r.length, r.kind, r.creator, r.owner, tuple(r.stack),
                frozenset(r.mappers), r.revoked, r.prev) for i, r in core.regions.items()}
    peers = {i: (p.kind, p.alive, frozenset(p.segs), p.account.regions, p.account.bytes,
                 frozenset(p.enclaves), p.eof, p.how, tuple(p.tombs))
             for i, p in core.peers.items()}
    encl = [None if e is None else
            (e.peer, e.eid, e.gen, e.name, e.type, e.host, e.state, _frame(e.frame_in),
             tuple(sorted((k, _frame(f)) for k, f in e.out.items())), e.shm,
             tuple(_frame(f) for f in e.queue), e.end, e.create_rid,
             None if e.stopped_by is None else e.stopped_by.peer)
            for e in core.slots]
    return {
        "regions": regs, "peers": peers, "enclaves": encl, "gens": list(core.gens),
        "servers": {k: tuple(m.peer for m in pool.members) for k, pool in core.servers.items()},
        "pools": {h: (pool.name, pool.create_rid,
                      tuple(_frame(f) for f in pool.queue)) for h, pool in core.pools.items()},
        "arenas": {k: list(a.free) for k, a in core.arenas.items()},
        "timers": sorted((repr(_timer_key(k)), d) for k, d in core.timers.items()),
        "tombs": dict(core.tombs), "pending_seg": dict(core.pending_seg),
    }


class Driver:
    """The shell and all the peers around one Core (see the module docstring)."""

    def __init__(self, core: C.Core, auto_spawn: bool = True, auto_ready: bool = True):
        self.core = core
        self.auto_spawn = auto_spawn
        self.auto_ready = auto_ready
        self.now = 0.0
        self.inbox = defaultdict(list)        # peer -> [msg]
        self.mapped = defaultdict(dict)       # peer -> {seg: (vaddr, length)} in its process
        self.live: dict[int, int] = {}        # seg -> size
        self.created: list[int] = []
        self.freed: set[int] = set()
        self.failed: set[int] = set()         # segments the shell could not create
        self.tamper: set[int] = set()         # segments to report resized at their next grant
        # peers the shell cut off in the middle of a batch (a tampered segment, or a violation
        # a Verify found): the rest of that batch's Sends and Signals to them are dropped
        self.cut_off: set[int] = set()
        self.hold: dict[int, int] = {}        # seg -> peer it was last given to
        # strict mode: (peer, seg) whose process keeps a mapping of seg (a cheater), and
        # the cheaters reported to the core: their segments must not move until they die
        self.strict = core.config.isolation == "strict"
        self.cheat: set[tuple[int, int]] = set()
        self.caught: set[tuple[int, int]] = set()
        self.verified = 0                     # Verify effects that passed
        self.violations = 0                   # ... and that were reported
        # the lender model, kept from the grants the peers receive: seg -> [[peer, the
        # frame (run or call) in which it received the region, None for its creator]],
        # its creator first, its holder last
        self.chain: dict[int, list[list]] = {}
        self.open: set[int] = set()           # peers whose socket the shell holds
        self.closed: set[int] = set()         # peers the core closed (or failed to spawn)
        self.gone: set[int] = set()           # hosts that disconnected
        self.hosts: set[int] = set()
        self.enclaves: dict[int, dict] = {}   # enclave peer -> spawn spec
        self.stdio: dict[int, str] = {}       # enclave peer -> stdio of its Spawn
        self.procs: set[int] = set()          # enclave peers whose process is alive
        self.killed: set[int] = set()
        self.stopped: set[int] = set()        # enclave peers whose process is SIGSTOPped
        self.pending = defaultdict(Counter)   # peer -> rids of requests not answered yet
        self.fail_next_seg = False
        self.fail_next_spawn = False
        self.last_reply = None                # the reply to the last message()
        self.effects: list = []               # every effect, in order
        self.mark = 0                         # where the current event's effects start
        self.held_before: set = set()         # (peer, op, a) of the Sends held before it
        self._pid = 1000

    # ------------------------------------------------------------------ events
    def connect(self, uid=1000, pid=None):
        """A host connection; ``pid`` of an earlier one is another connection of the same
        host process (default: a new process)."""
        if pid is None:
            self._pid += 1
            pid = self._pid
        peer, fx = self.core.host_connected(uid, pid)
        _assert(peer not in self.hosts and peer not in self.enclaves, f"peer id {peer} reused")
        self.hosts.add(peer)
        self.open.add(peer)
        self._apply(fx)
        return peer

    def message(self, peer, msg, nfds=0):
        """Deliver ``msg`` from ``peer``; check its reply accounting; return the effects."""
        self._begin()
        p = self.core.peers.get(peer)
        was_alive = p is not None and p.alive
        rid = msg.get("rid")
        if type(rid) is not int or rid <= 0 or rid >= 1 << 64:
            rid = None
        is_host = peer in self.hosts
        note = not is_host and msg.get("op") in NOTES
        if note:
            rid = None
        src = {"peer": peer, "msg": msg, "own": None, "rid": rid, "note": note}
        fx = self.core.message(peer, msg, nfds, self.now)
        if not was_alive:
            _assert(fx == [], f"a message from dead peer {peer} had effects {fx}")
        fx = self._apply(fx, src)
        own = src["own"]
        self.last_reply = own
        if own is not None:       # the inbox keeps what arrives besides the reply
            self.inbox[peer] = [m for m in self.inbox[peer] if m is not own]
        if not was_alive:
            return fx
        op = msg.get("op")
        if own is None and peer in self.closed:
            return fx             # the core cut the peer off (e.g. a tampered segment)
        held = any(send.peer == peer and send.msg.get("rid") == rid
                   for sends in self.core.held.values() for send, _why in sends)
        if own is None:
            if held:
                pass        # strict: the reply waits until a holder that ended is reaped
            elif is_host:
                _assert(op in ("run", "create", "rerun"),
                        f"host request {msg!r:.200} got no reply")
            elif not note:
                # a call, or eapp_return_relay_page (answered at the rerun)
                _assert(op in ("call", "rrp"), f"enclave request {msg!r:.200} got no reply")
            if rid is not None and not note:
                self.pending[peer][rid] += 1
        elif own.get("op") == "r" and op in ("shmdt", "sdt"):
            _assert(len(own.get("d", ())) >= 1, "a detach reply names the segment")
        return fx

    def disconnected(self, peer):
        self._begin()
        _assert(peer in self.open, f"the shell has no socket for {peer}")
        self.open.discard(peer)
        if peer in self.hosts:
            self.gone.add(peer)
        return self._apply(self.core.disconnected(peer))

    def exited(self, peer, how="killed by signal 9"):
        self._begin()
        _assert(peer in self.procs, f"no process for {peer}")
        self.procs.discard(peer)
        # the socket may still hold messages: the core learns of the death with the EOF
        return self._apply(self.core.exited(peer, how, self.now))

    def die(self, peer, how="killed by signal 9", eof_first=True):
        """The enclave process of ``peer`` is dead: EOF on its socket and the zygote's report."""
        fx = []
        order = ("eof", "exit") if eof_first else ("exit", "eof")
        for what in order:
            if what == "eof" and peer in self.open:
                fx += self.disconnected(peer)
            if what == "exit" and peer in self.procs:
                fx += self.exited(peer, how)
        return fx

    def ready(self, peer):
        """The enclave ``peer`` says ready (when auto_ready is off)."""
        return self.message(peer, {"op": "ready"})

    def tick(self, dt=0.0):
        self._begin()
        self.now += dt
        return self._apply(self.core.tick(self.now))

    def shutdown(self):
        self._begin()
        return self._apply(self.core.shutdown())

    def _begin(self):
        """An event starts: where its effects start, and the Sends the core holds (strict
        mode) before it -- one released now was built in an earlier event."""
        self.mark = len(self.effects)
        self.held_before = {(send.peer, send.msg.get("op"), tuple(send.msg.get("a") or ()))
                            for sends in self.core.held.values() for send, _why in sends}

    # ------------------------------------------------------------------ effects
    def _apply(self, fx, src=None):
        """Perform ``fx`` like the shell; return the effects performed."""
        _assert(isinstance(fx, list), f"effects must be a list, not {fx!r}")
        done = []
        spawned = []
        for eff in fx:
            self.effects.append(eff)
            done.append(eff)
            t = type(eff)
            if t is Send:
                bad = [g[0] for g in eff.msg.get("g", ()) if g[0] in self.tamper]
                if bad:
                    self.tamper.discard(bad[0])
                    res = self.core.segment_tampered(bad[0], eff)
                    self.cut_off.update(e.peer for e in res if type(e) is Close)
                    done += self._apply(res, src)
                    continue
                if eff.peer in self.cut_off:
                    continue      # a send of this batch to a violator the shell cut off
                self._on_send(eff, src)
            elif t is NewSeg:
                seg, size, arena = eff
                _assert(seg not in self.created and seg not in self.failed,
                        f"segment {seg} created twice")
                _assert(size > 0 and size % self.core.page == 0, f"bad segment size {size}")
                _assert(arena in self.core.arenas, f"bad arena {arena!r}")
                if self.fail_next_seg:
                    self.fail_next_seg = False
                    self.failed.add(seg)
                    done += self._apply(self.core.segment_failed(seg, "cannot create"), src)
                    continue
                self.created.append(seg)
                self.live[seg] = size
                if src is not None:
                    self.hold[seg] = src["peer"]
                    self.chain[seg] = [[src["peer"], None]]
                done += self._apply(self.core.segment_created(seg), src)
            elif t is SplitSeg:
                seg, parent, size = eff
                _assert(seg not in self.created and seg not in self.failed,
                        f"segment {seg} created twice")
                _assert(parent in self.live, f"split of segment {parent} that is not live")
                _assert(size == self.live[parent], f"split family size {size} is not the "
                        f"file's {self.live[parent]}")
                if self.fail_next_seg:
                    self.fail_next_seg = False
                    self.failed.add(seg)
                    done += self._apply(self.core.segment_failed(seg, "cannot dup"), src)
                    continue
                self.created.append(seg)
                self.live[seg] = size
                self.hold[seg] = self.hold.get(parent)
                self.chain[seg] = [list(x) for x in self.chain.get(parent, ())]
                done += self._apply(self.core.segment_created(seg), src)
            elif t is FreeSeg:
                seg = eff.seg
                _assert(seg in self.live, f"FreeSeg of segment {seg} that is not live "
                        f"({'freed before' if seg in self.freed else 'never created'})")
                del self.live[seg]
                self.freed.add(seg)
                self.chain.pop(seg, None)
            elif t is Spawn:
                peer, spec, shm_seg, stdio = eff
                _assert(peer not in self.enclaves and peer not in self.hosts,
                        f"spawn of existing peer {peer}")
                _assert(isinstance(spec, dict) and {"eid", "handle", "name", "type", "code"}
                        <= set(spec), f"bad spawn spec {spec!r:.200}")
                _assert(spec["handle"] & 0xFFFFFFFF == spec["eid"], "handle/eid mismatch")
                _assert(stdio in ("message", "null"), f"bad stdio {stdio!r}")
                self.enclaves[peer] = spec
                self.stdio[peer] = stdio
                self.open.add(peer)
                if shm_seg is not None:
                    _assert(shm_seg in self.live, f"spawn with dead segment {shm_seg}")
                    vaddr, size, _off = spec["shm"]
                    self.mapped[peer][shm_seg] = (vaddr, size)
                else:
                    _assert("shm" not in spec, "shm window without its segment")
                spawned.append(peer)
            elif t is Kill:
                _assert(eff.peer in self.enclaves, f"kill of non-enclave {eff.peer}")
                self.killed.add(eff.peer)
            elif t is Signal:
                _assert(eff.peer in self.enclaves, f"signal to non-enclave {eff.peer}")
                _assert(eff.sig in ("stop", "cont"), f"bad signal {eff.sig!r}")
                if eff.peer in self.cut_off:
                    continue      # as a send: to a violator cut off earlier in this batch
                _assert(eff.peer not in self.closed, f"signal to closed peer {eff.peer}")
                if eff.sig == "stop":
                    _assert(eff.peer not in self.stopped, f"{eff.peer} stopped twice")
                    self.stopped.add(eff.peer)
                else:
                    _assert(eff.peer in self.stopped, f"{eff.peer} continued, not stopped")
                    self.stopped.discard(eff.peer)
            elif t is Close:
                self.open.discard(eff.peer)
                self.closed.add(eff.peer)
            elif t is Log:
                _assert(isinstance(eff.text, str), "log text must be a str")
            elif t is Stats:
                _assert(isinstance(eff.msg, dict) and eff.msg.get("op") == "r",
                        f"stats for a message that is not a reply: {eff.msg!r:.200}")
            elif t is Verify:
                done += self._verify(eff, src)
            else:
                raise Violation(f"unknown effect {eff!r:.200}")
        for peer in spawned:
            if not self.auto_spawn:
                continue
            if self.fail_next_spawn:
                exhausted = self.fail_next_spawn == "exhausted"
                self.fail_next_spawn = False
                self.open.discard(peer)
                self.closed.add(peer)
                done += self._apply(self.core.spawn_failed(
                    peer, "Too many open files" if exhausted else "no such file",
                    exhausted=exhausted), src)
            else:
                self.procs.add(peer)
                done += self._apply(self.core.spawned(peer, 40000 + peer), src)
                if self.auto_ready and peer in self.open:
                    done += self._apply(
                        self.core.message(peer, {"op": "ready"}, 0, self.now), src)
        return done

    def _verify(self, eff, src):
        """Perform a Verify as the shell does (the cheat set plays /proc/PID/maps)."""
        _assert(self.strict, "a Verify in the default mode")
        checks, send = eff.checks, eff.send
        _assert(type(send) is Send and checks, f"bad verify {eff!r:.200}")
        remap = {g[0] for g in send.msg.get("g", ()) if g[4] == "remap"}
        for peer, _pid, seg in checks:
            _assert(seg in remap, f"verify of segment {seg} the send does not grant")
            # (one the core reaped later in the same event: its process is gone, it
            # maps nothing; a destroyed pool's instance that had a loan of another's)
            _assert(peer in self.core.peers or peer in self.hosts
                    or peer in self.enclaves and peer not in self.procs,
                    f"verify of unknown peer {peer}, or of a live process it forgot")
        for peer, _pid, seg in checks:
            if (peer, seg) in self.cheat:
                self.violations += 1
                self.caught.add((peer, seg))
                res = self.core.isolation_violation(peer, seg, eff)
                # the rest of this batch to a violator the core closed is dropped by the
                # shell (no socket), as for a tampered segment
                self.cut_off.update(e.peer for e in res if type(e) is Close)
                return self._apply(res, src)
        self.verified += 1
        # every other live holder it knows of must have been checked
        named = {(p, s) for p, _pid, s in checks}
        for seg in remap:
            r = self.core.seg_region.get(seg)
            for m in (r.mappers if r is not None else ()):
                q = self.core.peers.get(m)
                if q is not None and (m, seg) in self.cheat:
                    _assert((m, seg) in named, f"cheater {m} on {seg} was not checked")
        return self._apply([send], src)

    def _on_send(self, eff, src):
        _assert(len(eff) == 3, f"bad send effect {eff!r:.200}")
        peer, msg, segs = eff
        # An enclave whose socket hit EOF may still get messages until the zygote reports its
        # exit (the shell drops them); after the core closed a socket, nothing may go to it.
        _assert(peer in self.hosts or peer in self.enclaves, f"send to unknown peer {peer}")
        _assert(peer not in self.closed, f"send to peer {peer} after the core closed it: "
                f"{msg!r:.200}; its history: "
                f"{[e for e in self.effects if getattr(e, 'peer', None) == peer][-8:]!r:.3000}")
        _assert(peer not in self.gone, f"send to host {peer} that is gone: {msg!r:.200}")
        _assert(isinstance(msg, dict) and isinstance(msg.get("op"), str), f"bad msg {msg!r}")
        if peer in self.stopped and msg.get("op") in ("call", "start"):
            # only a call of the stopped chain it joins now (a call its root sent before
            # its stop reached it): stopped in this very event, never a run
            # (strict: or a call held since such an event, for a holder to be reaped)
            _assert(msg["op"] == "call" and (
                Signal(peer, "stop") in self.effects[self.mark:]
                or (peer, "call", tuple(msg["a"])) in self.held_before),
                f"work {msg!r:.100} sent to stopped {peer}")
        mapped = self.mapped[peer]
        for seg in msg.get("d", ()):
            # (a former holder of a region that was split drops its old mapping)
            _assert(seg in self.freed or seg in self.failed or peer in self.hosts
                    or seg in self.core.fsize, f"drop of segment {seg} that is still live")
            _assert(seg in mapped,
                    f"drop of segment {seg} that {peer} does not map (or a duplicate drop)")
            mapped.pop(seg, None)
        fd_segs = []
        page = self.core.page
        for g in msg.get("g", ()):
            _assert(isinstance(g, list) and len(g) == 5, f"bad grant {g!r}")
            seg, vaddr, length, has_fd, kind = g
            _assert(kind in (("remap", "shm") if self.strict else ("relay", "shm")),
                    f"bad grant kind {g!r}")
            _assert(seg in self.live, f"grant of segment {seg} that is not live")
            _assert(vaddr % page == 0 and length > 0 and length % page == 0, f"bad grant {g}")
            if kind == "remap":
                # strict: the fd goes every time (the receiver unmapped it when it gave
                # the region up), and never while a cheater on it still lives
                _assert(has_fd == 1, f"strict grant without the fd: {g}")
                for q, s2 in self.caught | self.cheat:
                    _assert(s2 != seg or (q in self.enclaves and q not in self.procs),
                            f"segment {seg} granted to {peer} while {q}, which kept a "
                            f"mapping of it, still lives")
                fd_segs.append(seg)
            elif has_fd:
                _assert(seg not in mapped, f"grant of {seg} to {peer} with an fd it has")
                fd_segs.append(seg)
            else:
                _assert(mapped.get(seg) == (vaddr, length),
                        f"grant of {seg} to {peer} without an fd, but it maps "
                        f"{mapped.get(seg)} not {(vaddr, length)}")
            mapped[seg] = (vaddr, length)
            if kind in ("relay", "remap"):
                self.hold[seg] = peer
                self._follow_loan(seg, peer, msg["op"], g)
        _assert(list(segs) == fd_segs, f"fds {segs} do not match the grants {msg.get('g')}")
        op = msg["op"]
        if op == "r" and "split" in msg:
            # split_mem_region: the splitter re-keys its one mapping into the two halves
            s1, l1, s2, l2 = msg["split"]
            v = mapped.get(s1, (None,))[0]
            _assert(v is not None and mapped[s1][1] == l1 + l2 and s2 not in mapped,
                    f"split reply for a mapping {peer} does not have: {msg}")
            mapped[s1] = (v, l1)
            mapped[s2] = (v + l1, l2)
        if op == "acall":
            _assert(peer in self.enclaves and self.enclaves[peer]["type"] == C.SERVER,
                    "acall sent to a non-server")
            _assert(len(msg["a"]) == 3 and "rid" not in msg, "bad acall")
        if op == "call":
            _assert(peer in self.enclaves and self.enclaves[peer]["type"] == C.SERVER,
                    "call sent to a non-server")
            _assert(len(msg["a"]) == 3, "a call carries [req_arg, vaddr, req_size]")
            _assert("rid" not in msg, "a call delivered to a server carries no rid")
        elif op == "start":
            _assert(peer in self.enclaves and self.enclaves[peer]["type"] == C.NORMAL,
                    "start sent to a non-normal enclave")
        elif op == "grant":
            _assert("rid" not in msg and msg.get("g"), f"a grant carries grants and no rid: {msg}")
        if op in REPLY_OPS:
            self._account_reply(peer, msg, src)
        self.inbox[peer].append(msg)

    def _frame_of(self, peer):
        p = self.core.peers.get(peer)
        e = getattr(p, "enclave", None)
        return None if e is None else e.frame_in

    def _skippable(self, peer, frame):
        """A lender the region may pass on its way back: dead, or no longer in the frame
        (the run, or the call it serves) in which it received the region.  Its creator
        (``frame`` None) stays a lender while it lives."""
        p = self.core.peers.get(peer)
        if p is None or not p.alive:
            return True
        return frame is not None and self._frame_of(peer) is not frame

    def _follow_loan(self, seg, peer, op, grant=None):
        """The model of "a loan returns to its nearest live lender": a relay region granted
        to ``peer`` in a message ``op``.  Lent on (a ``call`` to a server, a ``start`` of a
        run), the chain grows by the new holder: a peer already in it may get it again
        only in a new frame (it left the one it got it in, or it created the region).
        Going back, it reaches the nearest entry of ``peer``: every lender it passes must
        be skippable and the one it reaches must not be.  Given for good (a response
        region), the chain starts again with its new owner."""
        chain = self.chain.setdefault(seg, [[peer, None]])
        if op == "acall":                      # given to the server for good
            self.chain[seg] = [[peer, None]]
            return
        fi = self._frame_of(peer)
        if (op == "r" and fi is not None and fi.kind == "run" and chain
                and chain[-1][0] == fi.caller and all(q != peer for q, _ in chain)
                and any(r.seg == seg for r in fi.loans)):
            op = "start"                       # a rerun: the host lends it again
            for q, frame in chain:
                _assert(q != peer or frame is None or self._skippable(q, frame),
                        f"segment {seg} lent on to {peer}, a lender still in its frame "
                        f"(lenders {chain})")
            chain.append([peer, self._frame_of(peer)])
            return
        if chain[-1][0] == peer:
            return                             # its holder has it again (a refused call)
        back = [i for i, (q, _) in enumerate(chain) if q == peer]
        if not back:                           # a response region: a new owner for good
            self.chain[seg] = [[peer, None]]
            return
        i = back[-1]
        for q, frame in chain[i + 1:-1]:
            _assert(self._skippable(q, frame), f"segment {seg} went back to {peer} past "
                    f"lender {q}, which is alive and still in the frame it got it in")
        p = self.core.peers.get(peer)
        # (a peer that died later in the same event got messages the shell drops)
        if i and p is not None and p.alive:
            _assert(not self._skippable(*chain[i]), f"segment {seg} went back to "
                    f"{peer}, which has left the frame it got it in (lenders {chain})")
        del chain[i + 1:]

    def _account_reply(self, peer, msg, src):
        rid = msg.get("rid")
        if src is not None and src["peer"] == peer and src["own"] is None:
            if rid is not None and rid == src["rid"] and not src["note"]:
                src["own"] = msg
                return
            if rid is None:
                _assert(msg["op"] == "e", "a rid-less reply must be an error")
                _assert(src["rid"] is None or self.pending[peer][src["rid"]] > 0,
                        f"a request with a (fresh) rid was answered without one: "
                        f"{msg!r:.200}")
                src["own"] = msg
                return
        _assert(rid is not None, f"a rid-less error outside the peer's own message: "
                f"{msg!r:.200}")
        _assert(self.pending[peer][rid] > 0, f"unsolicited reply to {peer}: {msg!r:.200}")
        self.pending[peer][rid] -= 1
        if not self.pending[peer][rid]:
            del self.pending[peer][rid]

    # ------------------------------------------------------------------ checks
    def check(self):
        """Invariants of the core's state, and of the core against what the peers saw."""
        core = self.core
        held = {g[0] for sends in core.held.values() for send, _why in sends
                for g in send.msg.get("g", ())}
        page = core.page
        regs = list(core.regions.values())
        _assert(not core.pending_seg, "a segment creation was never answered")
        # regions: indexes, alignment, arenas, no overlap, allocator partition
        by_arena = defaultdict(list)
        for r in regs:
            _assert(core.by_vaddr.get(r.vaddr) is r, f"by_vaddr misses region {r.id:#x}")
            _assert(core.seg_region.get(r.seg) is r, f"seg_region misses region {r.id:#x}")
            _assert(r.vaddr % page == 0 and r.length > 0 and r.length % page == 0,
                    f"region {r.id:#x} is not page aligned")
            arena = arena_of(core, r.vaddr)
            _assert(arena is not None, f"region {r.id:#x} lies in no arena")
            a = core.arenas[arena]
            _assert(r.vaddr + r.length <= a.base + a.size, f"region {r.id:#x} leaves its arena")
            want = "shm" if r.kind == "shm" else (
                "relay" if r.creator in self.hosts else "mmap")
            _assert(arena == want, f"region {r.id:#x} ({r.kind}) in the {arena} arena")
            by_arena[arena].append((r.vaddr, r.length))
        _assert(len(core.by_vaddr) == len(regs) and len(core.seg_region) == len(regs),
                "stale entries in by_vaddr / seg_region")
        for name, a in core.arenas.items():
            spans = sorted(by_arena[name] + list(a.free))
            pos = a.base
            for start, n in spans:
                _assert(start == pos, f"{name} arena: overlap or hole at {start:#x} "
                        f"(expected {pos:#x})")
                pos = start + n
            _assert(pos == a.base + a.size, f"{name} arena: {pos:#x} != end")
        # segments: live exactly for regions that have a monitor fd
        want_live = {r.seg: core.fsize.get(r.seg, r.length) for r in regs if not r.revoked}
        _assert(self.live == want_live,
                f"live segments {sorted(self.live)} != regions' {sorted(want_live)}")
        # frames, queues, deadlines
        queued = [f for e in core.slots if e is not None for f in e.queue]
        # (an asynchronous call is answered at once and waits without a deadline)
        _assert(all(f.queued and (not f.answered or f.kind == "asyn") for f in queued),
                "a frame in a queue is not marked queued (or was answered)")
        for f in queued:
            if f.kind == "asyn":
                _assert(f.deadline is None and f not in core.timers, "a deadline for an asyn")
                continue
            _assert(core.timers.get(f) == f.deadline and f.deadline is not None,
                    "a queued call has no deadline")
        for k, d in core.timers.items():
            if isinstance(k, C.Frame):
                _assert(k.deadline == d, "timer and frame deadline differ")
                _assert(not k.answered, "a deadline for an answered frame")
            elif isinstance(k, C.Enclave):
                _assert(k.state == C.STARTING, "a create deadline for a started enclave")
            else:
                q = core.peers.get(k[1])
                _assert(q is not None and not q.eof and q.how is not None,
                        "an EOF deadline for a peer that is not waiting for EOF")
        escrow = {r.id for f in queued for r in f.loans}
        # relay ownership
        for r in regs:
            if r.kind == "shm":
                _assert(r.owner is None and not r.stack, f"shm region {r.id:#x} has an owner")
                continue
            if r.owner is None:
                _assert(r.id in escrow, f"relay region {r.id:#x} has no owner and no queued "
                        f"call holds it")
            else:
                _assert(r.id not in escrow, f"relay region {r.id:#x} is owned by {r.owner} "
                        f"and in escrow")
                o = core.peers.get(r.owner)
                _assert(o is not None and o.alive,
                        f"relay region {r.id:#x} is owned by dead peer {r.owner}")
                # (a detached region; in strict mode a grant held until a violator dies)
                if not (o.kind == C.HOST and r.seg not in o.segs) and r.seg not in held:
                    _assert(self.hold.get(r.seg) == r.owner,
                            f"region {r.id:#x} is owned by {r.owner} but was last given "
                            f"to {self.hold.get(r.seg)}")
            for lender in r.stack:
                # its creator may get it back in a new frame while a loan of it is out
                # (its own call timed out, then the holder calls it with the region)
                _assert(lender != r.owner or lender == r.creator,
                        f"region {r.id:#x} lent to its own lender")
        # mappings
        for r in regs:
            for m in r.mappers:
                q = core.peers.get(m)
                _assert(q is not None and q.alive, f"dead peer {m} maps region {r.id:#x}")
        segs_of = {r.seg: r for r in regs}
        for pid_, q in core.peers.items():
            if not q.alive:
                continue
            if not q.eof:
                _assert(q.id in self.open, f"live peer {pid_} has no socket")
            for s in q.segs:
                _assert(s in segs_of and pid_ in segs_of[s].mappers,
                        f"peer {pid_} maps segment {s} that has no region / mapper entry")
            for r in regs:
                # (strict: a host that detached a schrodinger region stays its mapper)
                if pid_ in r.mappers and not (self.strict and q.kind == C.HOST
                                              and r.kind == "relay"):
                    _assert(r.seg in q.segs, f"mapper {pid_} of {r.id:#x} lacks its segment")
            # (strict: a Send held until a process is reaped is not counted: the core
            # records a grant when it goes)
            seen = set(self.mapped[pid_]) - set(q.drops)
            _assert(seen == q.segs, f"peer {pid_} maps {sorted(seen)} but the core thinks "
                    f"{sorted(q.segs)}")
        # quotas
        for r in regs:
            _assert(r.account is not None, f"region {r.id:#x} is charged to no account")
        # an enclave's account outlives it while a region it created does
        accounts = {id(q.account): q.account for q in core.peers.values()}
        accounts.update({id(a): a for a in core.accounts.values()})
        accounts.update({id(r.account): r.account for r in regs if r.account is not None})
        for a in accounts.values():
            mine = [r for r in regs if r.account is a]
            _assert(a.regions == len(mine) and a.bytes == sum(r.length for r in mine),
                    f"quota accounting of {a.key} is off")
        for p_ in core.peers.values():
            if p_.kind == C.HOST and p_.alive:
                _assert(core.accounts.get(p_.account.key) is p_.account
                        and p_.id in p_.account.peers, f"host {p_.id} lost its account")
        for key, a in core.accounts.items():
            _assert(a.key == key and (a.peers or a.regions), f"account {key} is stale")
        # enclaves
        for eid, e in enumerate(core.slots):
            if e is None:
                continue
            _assert(e.eid == eid and core.gens[eid] == e.gen, f"slot {eid} is inconsistent")
            q = core.peers.get(e.peer)
            _assert(q is not None and q.enclave is e, f"enclave {eid} lost its peer")
            if e.state == C.DONE:
                # (a dead instance's pool may still queue calls for the live ones)
                _assert(not q.alive and e.frame_in is None and not e.out
                        and (e.pool is not None or not e.queue),
                        f"finished enclave {eid} still holds frames")
                continue
            _assert(q.alive, f"enclave {eid} is {e.state} but its peer is dead")
            if e.pool is None:
                _assert((e.state == C.STARTING) == (e.create_rid is not None),
                        f"enclave {eid}: state {e.state} vs create rid {e.create_rid}")
            else:
                pool = e.pool
                _assert(e.create_rid is None, "an instance holds the create's rid")
                starting = sum(1 for m in pool.live() if m.state == C.STARTING)
                _assert(e.state != C.STARTING or pool.create_rid is not None,
                        f"instance {eid} starts but its pool's create was answered")
                _assert(pool.create_rid is None or starting > 0,
                        f"pool {pool.name!r}: its create waits but no instance starts")
            if e.type == C.SERVER:
                _assert(e.pool is not None and core.servers.get(e.name) is e.pool
                        and e in e.pool.members, f"server {e.name!r} not registered")
                _assert(e.state in (C.STARTING, C.IDLE, C.SERVING),
                        f"server in state {e.state}")
                _assert((e.state == C.SERVING) == (e.frame_in is not None),
                        f"server {e.name!r} state {e.state} vs frame {e.frame_in}")
                if e.frame_in is not None:
                    _assert(e.frame_in.kind in ("call", "asyn") and e.frame_in.server is e,
                            "bad frame")
                if e.state == C.IDLE and e.stopped_by is None:
                    _assert(not e.queue, f"idle server {e.name!r} has a queue")
            else:
                _assert(e.state in (C.STARTING, C.CREATED, C.RUNNING),
                        f"normal in state {e.state}")
                _assert((e.state == C.RUNNING) == (e.frame_in is not None
                                                   and e.frame_in.kind == "run"),
                        f"normal enclave {eid} state vs frame")
                _assert(not e.queue, "a normal enclave has a queue")
            if e.out:
                _assert(e.state in (C.RUNNING, C.SERVING), "a waiting enclave is not running")
            for rid, f in e.out.items():
                _assert(f.caller == e.peer and f.rid == rid and not f.answered,
                        "an outgoing frame of another caller, or answered")
                if f.queued:
                    _assert(any(g is f for g in f.server.queue), "queued call not in queue")
                else:
                    _assert(f.server.frame_in is f, "running call not served")
            fi = e.frame_in
            if fi is not None and fi.kind == "call" and not fi.answered:
                c = core.peers.get(fi.caller)
                _assert(c is not None and c.alive and c.enclave.out.get(fi.rid) is fi,
                        "caller forgot its call")
        for name, pool in core.servers.items():
            live_members = pool.live()
            _assert(pool.name == name and live_members, f"stale server registration {name!r}")
            _assert(core.pools.get(pool.handle) is pool, f"pool {name!r} lost its handle")
            for m in live_members:
                _assert(m.type == C.SERVER and m.pool is pool and core.slots[m.eid] is m,
                        f"stale instance of {name!r}")
            if pool.queue:
                _assert(all(m.state != C.IDLE or m.stopped_by is not None
                            for m in live_members),
                        f"an instance of {name!r} idles while callers queue")
        _assert(set(core.pools.values()) == set(core.servers.values()) and
                len(core.pools) == len(core.servers), "pools and servers disagree")
        for pid_, q in core.peers.items():
            if q.kind == C.ENCLAVE:
                _assert(core.slots[q.enclave.eid] is q.enclave, f"enclave peer {pid_} "
                        f"without its slot")
        # stops: the process is stopped exactly when the core says so; every stop has a
        # live root that stopped itself
        for e in core.slots:
            if e is None or e.state == C.DONE:
                if e is not None:
                    _assert(e.stopped_by is None, f"finished {e.name!r} is still stopped")
                continue
            if e.peer in self.procs:
                _assert((e.stopped_by is not None) == (e.peer in self.stopped),
                        f"enclave {e.name!r}: core stopped_by {e.stopped_by} vs process "
                        f"stopped {e.peer in self.stopped}")
            root = e.stopped_by
            if root is not None:
                _assert(root.state != C.DONE and root.stopped_by is root
                        and core.slots[root.eid] is root,
                        f"enclave {e.name!r} is stopped by {root.name!r}, not a live root")
                _assert(e.state != C.STARTING, "a starting enclave is stopped")
        # no wait-for cycles: following the calls enclaves wait for never comes back
        live = [e for e in core.slots if e is not None]
        for e in live:
            for f in e.out.values():
                _assert(not core._waits_for(f.server, e),
                        f"deadlock: a cycle of waiting calls through {e.name!r}")
        # replies: every peer waits exactly for what the core still has to answer
        for pid_, q in core.peers.items():
            if not q.alive:
                continue
            if q.kind == C.ENCLAVE:
                want = Counter(q.enclave.out.keys())
                fi = q.enclave.frame_in
                if fi is not None and fi.kind == "run" and fi.paused is not None:
                    want[fi.paused] += 1       # its eapp_return_relay_page, until the rerun
            else:
                want = Counter(e.frame_in.rid for e in core.slots
                               if e is not None and e.host == pid_ and e.frame_in is not None
                               and e.frame_in.kind == "run" and not e.frame_in.answered)
                want.update(e.create_rid for e in core.slots
                            if e is not None and e.host == pid_ and e.create_rid is not None)
                want.update(pool.create_rid for pool in core.servers.values()
                            if pool.host == pid_ and pool.create_rid is not None)
            # (strict: a reply held until a process that had its region is reaped)
            want.update(send.msg["rid"] for sends in core.held.values()
                        for send, _why in sends
                        if send.peer == pid_ and send.msg.get("rid") is not None)
            _assert(+self.pending[pid_] == want,
                    f"peer {pid_} waits for {dict(self.pending[pid_])}, the core has "
                    f"{dict(want)} to answer")
        # tombstones belong to live hosts and are bounded
        for h, (host, cls, why) in core.tombs.items():
            q = core.peers.get(host)
            _assert(q is not None and q.kind == C.HOST and h in q.tombs, "stray tombstone")
            _assert(isinstance(why, str) and cls.code < 0, "bad tombstone")
        for q in core.peers.values():
            _assert(len(q.tombs) <= core.config.max_tombstones, "tombstones unbounded")

    def finish(self):
        """Disconnect every host and report every exit; nothing may be left behind."""
        for h in sorted(self.hosts & self.open):
            self.disconnected(h)
        for _ in range(3):
            for peer in sorted(self.enclaves):
                if peer in self.open:
                    self.disconnected(peer)
                if peer in self.procs:
                    self.exited(peer)
        core = self.core
        _assert(not core.peers, f"peers left: {sorted(core.peers)}")
        _assert(all(e is None for e in core.slots), "enclave slots left")
        _assert(not core.regions, f"regions left: {sorted(core.regions)}")
        _assert(not core.servers and not core.pools and not core.timers,
                "servers or deadlines left")
        _assert(not core.tombs, "tombstones left")
        _assert(not self.live, f"segments never freed: {sorted(self.live)}")
        _assert(set(self.created) == self.freed, "created and freed segments differ")
        for name, a in core.arenas.items():
            _assert(a.free == [(a.base, a.size)], f"{name} arena not fully free: {a.free}")

    # ------------------------------------------------------------------ conveniences
    def take(self, peer):
        """Pop and return every message queued for ``peer``."""
        msgs = self.inbox[peer]
        self.inbox[peer] = []
        return msgs
