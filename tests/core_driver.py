"""Drive a :class:`tvmrt.monitor.core.Core` the way the I/O shell does, checking every effect.

The :class:`Driver` plays the daemon and every peer process at once, with no sockets and no
processes.  It keeps what the shell and the peers would know:

* the live segments (from ``new_seg`` / ``free_seg``), each freed at most once;
* which segments each peer's process maps (grants with an fd add one, ``"d"`` drops remove
  one, a host's successful ``shmdt``/``sdt`` removes one), so that a grant carries an fd
  exactly when the peer does not map the segment yet;
* which peer a relay segment was last granted to (its creator before any grant);
* sockets (no ``send`` to a peer after the core closed it, or to a host that left);
* an inbox per peer (without the immediate replies to its own requests: those are in
  :attr:`Driver.last_reply`), and reply accounting: every request gets exactly one reply,
  a host's ``run`` and an enclave's ``call`` get theirs later, nothing is answered twice.

Every violation raises :class:`Violation` (an AssertionError) at the effect that shows it.
:meth:`Driver.check` verifies the invariants of the core's state between events, and
:meth:`Driver.finish` disconnects every host, reports every exit and checks that nothing is
left behind.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from tvmrt._layout import PAGE
from tvmrt.monitor import core as C

REPLY_OPS = ("r", "e")


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
            f.deadline, f.queued)


def snapshot(core):
    """Everything the core knows, as comparable values (pending unmaps left out: an error
    reply may legitimately carry them)."""
    regs = {i: (r.seg, r.vaddr, r.length, r.kind, r.creator, r.owner, tuple(r.stack),
                frozenset(r.mappers), r.revoked) for i, r in core.regions.items()}
    peers = {i: (p.kind, p.alive, frozenset(p.segs), p.regions, p.bytes,
                 frozenset(p.enclaves), p.eof, p.how) for i, p in core.peers.items()}
    encl = [None if e is None else
            (e.peer, e.eid, e.gen, e.name, e.type, e.host, e.state, _frame(e.frame_in),
             _frame(e.frame_out), e.shm, tuple(_frame(f) for f in e.queue))
            for e in core.slots]
    return {
        "regions": regs, "peers": peers, "enclaves": encl, "gens": list(core.gens),
        "servers": {k: e.peer for k, e in core.servers.items()},
        "arenas": {k: list(a.free) for k, a in core.arenas.items()},
        "queued": [_frame(f) for f in core.queued],
        "next": (core._next_peer, core._next_id, core._next_seg),
    }


class Driver:
    """The shell and all the peers around one Core (see the module docstring)."""

    def __init__(self, core: C.Core | None = None, auto_spawn: bool = True):
        self.core = core if core is not None else C.Core(key=b"k" * 32)
        self.auto_spawn = auto_spawn
        self.now = 0.0
        self.inbox = defaultdict(list)        # peer -> [msg]
        self.mapped = defaultdict(dict)       # peer -> {seg: (vaddr, length)} in its process
        self.live: dict[int, int] = {}        # seg -> size
        self.created: list[int] = []
        self.freed: set[int] = set()
        self.failed: set[int] = set()         # segments the shell could not create
        self.hold: dict[int, int] = {}        # seg -> peer it was last given to
        self.open: set[int] = set()           # peers whose socket the shell holds
        self.closed: set[int] = set()         # peers the core closed (or failed to spawn)
        self.gone: set[int] = set()           # hosts that disconnected
        self.hosts: set[int] = set()
        self.enclaves: dict[int, dict] = {}   # enclave peer -> spawn spec
        self.procs: set[int] = set()          # enclave peers whose process is alive
        self.killed: set[int] = set()
        self.waiting: dict[int, bool] = {}    # enclave peer -> a call is outstanding
        self.pending = defaultdict(Counter)   # host -> rids of runs not answered yet
        self.fail_next_seg = False
        self.fail_next_spawn = False
        self.last_reply = None                # the reply to the last message()
        self.effects: list = []               # every effect, in order
        self._pid = 1000

    # ------------------------------------------------------------------ events
    def connect(self, uid=1000):
        self._pid += 1
        peer, fx = self.core.host_connected(uid, self._pid)
        _assert(peer not in self.hosts and peer not in self.enclaves, f"peer id {peer} reused")
        self.hosts.add(peer)
        self.open.add(peer)
        self._apply(fx)
        return peer

    def message(self, peer, msg, nfds=0):
        """Deliver ``msg`` from ``peer``; check its reply accounting; return the effects."""
        p = self.core.peers.get(peer)
        was_alive = p is not None and p.alive
        src = {"peer": peer, "msg": msg, "own": None, "is_host": peer in self.hosts}
        if src["is_host"]:
            rid = msg.get("rid")
            src["rid"] = rid if isinstance(rid, int) else None
            seg = None
            if msg.get("op") in ("shmdt", "sdt") and type(msg.get("id")) is int:
                r = self.core.regions.get(msg["id"])
                seg = r.seg if r is not None else None
        fx = self.core.message(peer, msg, nfds, self.now)
        if not was_alive:
            _assert(fx == [], f"a message from dead peer {peer} had effects {fx}")
        fx = self._apply(fx, src)
        self.last_reply = src["own"]
        if src["own"] is not None:       # the inbox keeps what arrives besides the reply
            self.inbox[peer] = [m for m in self.inbox[peer] if m is not src["own"]]
        if not was_alive:
            return fx
        op = msg.get("op")
        own = src["own"]
        if src["is_host"]:
            if own is None:
                _assert(op == "run", f"host request {msg!r:.200} got no reply")
                self.pending[peer][src["rid"]] += 1
            elif own.get("op") == "r" and seg is not None:
                self.mapped[peer].pop(seg, None)     # the host runtime unmaps on shmdt/sdt
        else:
            if own is None:
                _assert(op in ("call", "ret", "exit", "fault"),
                        f"enclave request {msg!r:.200} got no reply")
                if op == "call":
                    _assert(not self.waiting.get(peer), "a second call was accepted")
                    self.waiting[peer] = True
        return fx

    def disconnected(self, peer):
        _assert(peer in self.open, f"the shell has no socket for {peer}")
        self.open.discard(peer)
        if peer in self.hosts:
            self.gone.add(peer)
        return self._apply(self.core.disconnected(peer))

    def exited(self, peer, how="killed by signal 9"):
        _assert(peer in self.procs, f"no process for {peer}")
        self.procs.discard(peer)
        # the socket may still hold messages: the core learns of the death with the EOF
        return self._apply(self.core.exited(peer, how))

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

    def tick(self, dt=0.0):
        self.now += dt
        return self._apply(self.core.tick(self.now))

    def shutdown(self):
        return self._apply(self.core.shutdown())

    # ------------------------------------------------------------------ effects
    def _apply(self, fx, src=None):
        """Perform ``fx`` like the shell; return the effects performed."""
        _assert(isinstance(fx, list), f"effects must be a list, not {fx!r}")
        done = []
        spawned = []
        i = 0
        while i < len(fx):
            eff = fx[i]
            i += 1
            self.effects.append(eff)
            done.append(eff)
            kind = eff[0]
            if kind == "send":
                self._on_send(eff, src)
            elif kind == "new_seg":
                _, seg, size, arena = eff
                _assert(seg not in self.created and seg not in self.failed,
                        f"segment {seg} created twice")
                _assert(size > 0 and size % PAGE == 0, f"bad segment size {size}")
                _assert(arena in self.core.arenas, f"bad arena {arena!r}")
                if self.fail_next_seg:
                    # exactly what the daemon does when it cannot create the segment
                    self.fail_next_seg = False
                    self.failed.add(seg)
                    rid = src.get("rid") if src is not None else None
                    fx = self.core.segment_failed(seg, "cannot create", rid, fx[i:])
                    i = 0
                    continue
                self.created.append(seg)
                self.live[seg] = size
                if src is not None:
                    self.hold[seg] = src["peer"]
            elif kind == "free_seg":
                seg = eff[1]
                _assert(seg in self.live, f"free_seg of segment {seg} that is not live "
                        f"({'freed before' if seg in self.freed else 'never created'})")
                del self.live[seg]
                self.freed.add(seg)
            elif kind == "spawn":
                _, peer, spec, shm_seg = eff
                _assert(peer not in self.enclaves and peer not in self.hosts,
                        f"spawn of existing peer {peer}")
                _assert(isinstance(spec, dict) and {"eid", "handle", "name", "type", "code"}
                        <= set(spec), f"bad spawn spec {spec!r:.200}")
                _assert(spec["handle"] & 0xFFFFFFFF == spec["eid"], "handle/eid mismatch")
                self.enclaves[peer] = spec
                self.open.add(peer)
                if shm_seg is not None:
                    _assert(shm_seg in self.live, f"spawn with dead segment {shm_seg}")
                    vaddr, size, _off = spec["shm"]
                    self.mapped[peer][shm_seg] = (vaddr, size)
                else:
                    _assert("shm" not in spec, "shm window without its segment")
                spawned.append(peer)
            elif kind == "kill":
                _assert(eff[1] in self.enclaves, f"kill of non-enclave {eff[1]}")
                self.killed.add(eff[1])
            elif kind == "close":
                self.open.discard(eff[1])
                self.closed.add(eff[1])
            elif kind == "log":
                _assert(isinstance(eff[1], str), "log text must be a str")
            else:
                raise Violation(f"unknown effect {eff!r:.200}")
        for peer in spawned:
            if not self.auto_spawn:
                continue
            if self.fail_next_spawn:
                self.fail_next_spawn = False
                self.open.discard(peer)           # the daemon drops the socket first
                self.closed.add(peer)
                self._apply(self.core.spawn_failed(peer, "no such file"))
            else:
                self.procs.add(peer)
                self._apply(self.core.spawned(peer, 40000 + peer))
        return done

    def _on_send(self, eff, src):
        _assert(len(eff) == 4, f"bad send effect {eff!r:.200}")
        _, peer, msg, segs = eff
        # An enclave whose socket hit EOF may still get messages until the zygote reports its
        # exit (the shell drops them); after the core closed a socket, nothing may go to it.
        _assert(peer in self.hosts or peer in self.enclaves, f"send to unknown peer {peer}")
        _assert(peer not in self.closed, f"send to peer {peer} after the core closed it: "
                f"{msg!r:.200}")
        _assert(peer not in self.gone, f"send to host {peer} that is gone: {msg!r:.200}")
        _assert(isinstance(msg, dict) and isinstance(msg.get("op"), str), f"bad msg {msg!r}")
        mapped = self.mapped[peer]
        for seg in msg.get("d", ()):
            _assert(seg in self.freed or seg in self.failed,
                    f"drop of segment {seg} that is still live")
            _assert(seg in mapped, f"drop of segment {seg} that {peer} does not map "
                    f"(or a duplicate drop)")
            mapped.pop(seg)
        fd_segs = []
        for g in msg.get("g", ()):
            _assert(isinstance(g, list) and len(g) == 4, f"bad grant {g!r}")
            seg, vaddr, length, has_fd = g
            _assert(seg in self.live, f"grant of segment {seg} that is not live")
            _assert(vaddr % PAGE == 0 and length > 0 and length % PAGE == 0, f"bad grant {g}")
            if has_fd:
                _assert(seg not in mapped, f"grant of {seg} to {peer} with an fd it has")
                fd_segs.append(seg)
            else:
                _assert(mapped.get(seg) == (vaddr, length),
                        f"grant of {seg} to {peer} without an fd, but it maps "
                        f"{mapped.get(seg)} not {(vaddr, length)}")
            mapped[seg] = (vaddr, length)
            self.hold[seg] = peer
        _assert(list(segs) == fd_segs, f"fds {segs} do not match the grants {msg.get('g')}")
        op = msg["op"]
        if op == "call":
            _assert(peer in self.enclaves and self.enclaves[peer]["type"] == C.SERVER,
                    "call sent to a non-server")
            _assert(len(msg["a"]) == 3, "a call carries [req_arg, vaddr, req_size]")
        elif op == "start":
            _assert(peer in self.enclaves and self.enclaves[peer]["type"] == C.NORMAL,
                    "start sent to a non-normal enclave")
        if op in REPLY_OPS:
            self._account_reply(peer, msg, src)
        self.inbox[peer].append(msg)

    def _account_reply(self, peer, msg, src):
        if _is_own(src, peer):
            if peer in self.hosts:
                rid = msg.get("rid")
                if src["own"] is None and rid == src["rid"]:
                    src["own"] = msg
                    return
            elif src["own"] is None:
                _assert("rid" not in msg, "a reply to an enclave carries a rid")
                src["own"] = msg
                return
        if peer in self.hosts:
            rid = msg.get("rid")
            _assert(self.pending[peer][rid] > 0,
                    f"unsolicited reply to host {peer}: {msg!r:.200}")
            self.pending[peer][rid] -= 1
            if not self.pending[peer][rid]:
                del self.pending[peer][rid]
        else:
            _assert(self.waiting.get(peer), f"unsolicited reply to enclave {peer}: "
                    f"{msg!r:.200}")
            self.waiting[peer] = False

    # ------------------------------------------------------------------ checks
    def check(self):
        """Invariants of the core's state, and of the core against what the peers saw."""
        core = self.core
        regs = list(core.regions.values())
        # regions: indexes, alignment, arenas, no overlap, allocator partition
        by_arena = defaultdict(list)
        for r in regs:
            _assert(core.by_vaddr.get(r.vaddr) is r, f"by_vaddr misses region {r.id:#x}")
            _assert(core.seg_region.get(r.seg) is r, f"seg_region misses region {r.id:#x}")
            _assert(r.vaddr % PAGE == 0 and r.length > 0 and r.length % PAGE == 0,
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
        want_live = {r.seg: r.length for r in regs if not r.revoked}
        _assert(self.live == want_live,
                f"live segments {sorted(self.live)} != regions' {sorted(want_live)}")
        for r in regs:
            if r.revoked:
                _assert(r.seg in self.freed, f"revoked region {r.id:#x} still has its fd")
        # frames and queues
        queued = [f for e in core.slots if e is not None for f in e.queue]
        _assert(sorted(map(id, queued)) == sorted(map(id, core.queued)),
                "core.queued differs from the servers' queues")
        _assert(all(f.queued for f in queued), "a frame in a queue is not marked queued")
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
                _assert(self.hold.get(r.seg) == r.owner,
                        f"region {r.id:#x} is owned by {r.owner} but was last given to "
                        f"{self.hold.get(r.seg)}")
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
                if pid_ in r.mappers:
                    _assert(r.seg in q.segs, f"mapper {pid_} of {r.id:#x} lacks its segment")
            seen = set(self.mapped[pid_]) - set(q.drops)
            _assert(seen == q.segs, f"peer {pid_} maps {sorted(seen)} but the core thinks "
                    f"{sorted(q.segs)}")
        # quotas
        for pid_, q in core.peers.items():
            mine = [r for r in regs if r.creator == pid_]
            _assert(q.regions == len(mine) and q.bytes == sum(r.length for r in mine),
                    f"quota accounting of peer {pid_} is off")
        # enclaves
        for eid, e in enumerate(core.slots):
            if e is None:
                continue
            _assert(e.eid == eid and core.gens[eid] == e.gen, f"slot {eid} is inconsistent")
            q = core.peers.get(e.peer)
            _assert(q is not None and q.enclave is e, f"enclave {eid} lost its peer")
            if e.state == C.DONE:
                _assert(not q.alive and e.frame_in is None and e.frame_out is None
                        and not e.queue, f"finished enclave {eid} still holds frames")
                continue
            _assert(q.alive, f"enclave {eid} is {e.state} but its peer is dead")
            if e.type == C.SERVER:
                _assert(core.servers.get(e.name) is e, f"server {e.name!r} not registered")
                _assert(e.state in (C.IDLE, C.SERVING), f"server in state {e.state}")
                _assert((e.state == C.SERVING) == (e.frame_in is not None),
                        f"server {e.name!r} state {e.state} vs frame {e.frame_in}")
                if e.frame_in is not None:
                    _assert(e.frame_in.kind == "call" and e.frame_in.server is e, "bad frame")
                if e.state == C.IDLE:
                    _assert(not e.queue, f"idle server {e.name!r} has a queue")
            else:
                _assert(e.state in (C.CREATED, C.RUNNING), f"normal in state {e.state}")
                _assert((e.state == C.RUNNING) == (e.frame_in is not None
                                                   and e.frame_in.kind == "run"),
                        f"normal enclave {eid} state vs frame")
            f = e.frame_out
            if f is not None:
                _assert(e.state in (C.RUNNING, C.SERVING), "a waiting enclave is not running")
                _assert(f.caller == e.peer, "frame_out of another caller")
                if f.queued:
                    _assert(any(g is f for g in f.server.queue), "queued call not in queue")
                else:
                    _assert(f.server.frame_in is f, "running call not served")
            if e.frame_in is not None and e.frame_in.kind == "call":
                c = core.peers.get(e.frame_in.caller)
                if c is not None and c.alive:
                    _assert(c.enclave.frame_out is e.frame_in, "caller forgot its call")
        for name, e in core.servers.items():
            _assert(e.type == C.SERVER and e.state != C.DONE and core.slots[e.eid] is e,
                    f"stale server registration {name!r}")
        for pid_, q in core.peers.items():
            if q.kind == C.ENCLAVE:
                _assert(core.slots[q.enclave.eid] is q.enclave, f"enclave peer {pid_} "
                        f"without its slot")
        # no wait-for cycles: following the calls enclaves wait for never comes back
        for e in core.slots:
            seen = set()
            cur = e
            while cur is not None and cur.frame_out is not None:
                _assert(id(cur) not in seen, f"deadlock: a cycle of waiting calls through "
                        f"{cur.name!r}")
                seen.add(id(cur))
                cur = cur.frame_out.server
        # replies: an enclave waits exactly when the core holds its call; a host waits for
        # exactly the runs the core has going
        for pid_, q in core.peers.items():
            if q.kind == C.ENCLAVE and q.alive:
                _assert(bool(self.waiting.get(pid_)) == (q.enclave.frame_out is not None),
                        f"enclave {pid_}: waiting={self.waiting.get(pid_)} but frame_out="
                        f"{q.enclave.frame_out}")
            if q.kind == C.HOST and q.alive:
                runs = Counter(e.frame_in.rid for e in core.slots
                               if e is not None and e.host == pid_ and e.frame_in is not None
                               and e.frame_in.kind == "run")
                _assert(+self.pending[pid_] == runs,
                        f"host {pid_} waits for runs {dict(self.pending[pid_])}, the core "
                        f"runs {dict(runs)}")

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
        _assert(not core.servers and not core.queued, "servers or queued calls left")
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


def _is_own(src, peer):
    return src is not None and src["peer"] == peer
