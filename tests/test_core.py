"""Unit tests of the monitor's state machine alone (tvmrt.monitor.core): no processes, no sockets.

Every test drives a Core through :class:`core_driver.Driver`, which plays the shell and the
peers and checks each effect (live segments, fds in grants, replies, open sockets); the
invariants of :meth:`Driver.check` are verified at the end of every test.
"""
from __future__ import annotations

import itertools

import pytest

from core_driver import Driver, snapshot
from tvmrt import errors as E
from tvmrt._layout import ARENAS, PAGE
from tvmrt.monitor import core as C
from tvmrt.monitor.config import Config
from tvmrt.monitor.core import NORMAL, SERVER, Core, measure
from tvmrt.monitor.effects import Close, FreeSeg, Kill, NewSeg, Send, Spawn

pytestmark = pytest.mark.timeout(120)

KEY = b"k" * 32
_rids = itertools.count(1)


def new_core(**kw):
    return Core(Config(key=KEY, **kw))


@pytest.fixture
def d():
    drv = Driver(new_core())
    yield drv
    drv.check()


class _Any:
    def __eq__(self, other):
        return True

    def __repr__(self):
        return "ANY"


ANY = _Any()
NOTES = ("ready", "ret", "exit", "fault")


# ---------------------------------------------------------------------- helpers
def hreq(d, host, op, **kw):
    """A host request; returns its reply (None for a run still going)."""
    d.message(host, {"op": op, "rid": next(_rids), **kw})
    return d.last_reply


def ereq(d, peer, op, **kw):
    """An enclave request (with a fresh rid) or notification; returns its immediate reply
    (None if deferred)."""
    msg = {"op": op, **kw}
    if op not in NOTES and "rid" not in kw:
        msg["rid"] = next(_rids)
    d.message(peer, msg)
    return d.last_reply


def ok(reply):
    assert reply is not None and reply["op"] == "r", reply
    return reply


def err(reply, exc):
    assert reply is not None and reply["op"] == "e" and reply["c"] == exc.code, reply
    assert isinstance(reply["why"], str) and reply["why"]
    return reply


def effects(d, kind):
    return [e for e in d.effects if type(e) is kind]


def has(fx, eff):
    """``eff`` is among ``fx`` (effects compare as tuples: check the type too)."""
    return any(type(e) is type(eff) and e == eff for e in fx)


def create(d, host, name="e", etype=NORMAL, **kw):
    """Create an enclave; returns (peer, handle)."""
    n = len(d.effects)
    rep = ok(hreq(d, host, "create", name=name, type=etype, code=b"print(1)", **kw))
    spawns = [e for e in d.effects[n:] if type(e) is Spawn]
    assert len(spawns) == 1
    assert spawns[0].spec["handle"] == rep["handle"]
    return spawns[0].peer, rep["handle"]


def server(d, host, name="srv", **kw):
    return create(d, host, name, SERVER, **kw)


def running(d, host, name="c", **runargs):
    """A normal enclave that has been run (its start message taken)."""
    peer, handle = create(d, host, name)
    assert hreq(d, host, "run", handle=handle, **runargs) is None
    (start,) = d.take(peer)
    assert start["op"] == "start"
    return peer, handle


def mmap(d, peer, size=PAGE):
    rep = ok(ereq(d, peer, "mmap", size=size))
    (g,) = rep["g"]
    assert g[1] == rep["vaddr"] and g[2] == size and g[3] == 1
    d.take(peer)
    return rep["vaddr"]


def seg_at(d, vaddr):
    return d.core.by_vaddr[vaddr].seg


def owner(d, vaddr):
    return d.core.by_vaddr[vaddr].owner


def call(d, caller, handle, a, **kw):
    return ereq(d, caller, "call", handle=handle, a=a, **kw)


def one(d, peer):
    msgs = d.take(peer)
    assert len(msgs) == 1, msgs
    return msgs[0]


def grants(msg):
    return sorted(map(tuple, msg.get("g", [])))


# ---------------------------------------------------------------------- host memory
def test_shmget_attach_detach_ctl(d):
    h = d.connect()
    rep = ok(hreq(d, h, "shmget", size=2 * PAGE))
    sid, vaddr = rep["id"], rep["vaddr"]
    assert sid == 0x10000 and rep["size"] == 2 * PAGE
    assert ARENAS["shm"][0] <= vaddr < ARENAS["shm"][0] + ARENAS["shm"][1]
    (new,) = effects(d, NewSeg)
    seg = new.seg
    assert new == NewSeg(seg, 2 * PAGE, "shm")

    sends = len(d.effects)
    rep = ok(hreq(d, h, "shmat", id=sid))
    assert rep["vaddr"] == vaddr and rep["size"] == 2 * PAGE
    assert rep["g"] == [[seg, vaddr, 2 * PAGE, 1, "shm"]]
    (send,) = [e for e in d.effects[sends:] if type(e) is Send]
    assert send.segs == [seg]                      # the fd goes with the grant
    err(hreq(d, h, "shmat", id=sid), E.BadState)             # already attached
    err(hreq(d, h, "shmctl", id=sid), E.BadState)            # still attached
    ok(hreq(d, h, "shmdt", id=sid))
    err(hreq(d, h, "shmdt", id=sid), E.BadState)             # not attached
    ok(hreq(d, h, "shmat", id=sid))                          # again: a new fd
    assert d.last_reply["g"][0][3] == 1
    ok(hreq(d, h, "shmdt", id=sid))
    assert not effects(d, FreeSeg)
    ok(hreq(d, h, "shmctl", id=sid))
    assert effects(d, FreeSeg) == [FreeSeg(seg)]
    err(hreq(d, h, "shmat", id=sid), E.UnknownId)
    err(hreq(d, h, "shmctl", id=sid), E.UnknownId)
    assert not d.core.regions


def test_sget_attach_detach_ctl(d):
    h = d.connect()
    rep = ok(hreq(d, h, "sget", size=PAGE))
    sid, vaddr = rep["id"], rep["vaddr"]
    assert ARENAS["relay"][0] <= vaddr < ARENAS["relay"][0] + ARENAS["relay"][1]
    assert effects(d, NewSeg)[0].arena == "relay"
    assert d.core.regions[sid].owner == h
    err(hreq(d, h, "shmat", id=sid), E.UnknownId)            # not a shm region
    rep = ok(hreq(d, h, "sat", id=sid))
    seg = rep["g"][0][0]
    assert rep["g"] == [[seg, vaddr, PAGE, 1, "relay"]]
    err(hreq(d, h, "sat", id=sid), E.BadState)
    err(hreq(d, h, "sctl", id=sid), E.BadState)
    ok(hreq(d, h, "sdt", id=sid))
    ok(hreq(d, h, "sctl", id=sid))
    assert effects(d, FreeSeg) == [FreeSeg(seg)]
    err(hreq(d, h, "sat", id=sid), E.UnknownId)
    # the relay arena is reused from its start
    assert ok(hreq(d, h, "sget", size=PAGE))["vaddr"] == vaddr


def test_regions_of_another_host_are_not_permitted(d):
    h1, h2 = d.connect(), d.connect()
    sid = ok(hreq(d, h1, "shmget", size=PAGE))["id"]
    rid_ = ok(hreq(d, h1, "sget", size=PAGE))["id"]
    before = snapshot(d.core)
    for op, i in (("shmat", sid), ("shmctl", sid), ("sat", rid_), ("sctl", rid_)):
        err(hreq(d, h2, op, id=i), E.NotPermitted)
    assert snapshot(d.core) == before


# ---------------------------------------------------------------------- create
def test_create_lowest_free_eid_and_generation_handles(d):
    h = d.connect()
    n = len(d.effects)
    rep = ok(hreq(d, h, "create", name="first", type=NORMAL, code=b"abc", path="/x/first.py"))
    assert rep["eid"] == 0 and rep["handle"] == 0
    assert rep["measurement"] == measure(NORMAL, "first", b"abc")
    (spawn,) = [e for e in d.effects[n:] if type(e) is Spawn]
    peer, spec, shm_seg, stdio = spawn
    assert shm_seg is None and stdio == "null"
    assert spec == {"eid": 0, "handle": 0, "name": "first", "type": NORMAL, "code": b"abc",
                    "path": "/x/first.py"}
    s_peer, s_handle = server(d, h, "srv")
    assert s_handle == 1
    assert d.core.servers["srv"].members[0].peer == s_peer
    err(hreq(d, h, "create", name="srv", type=SERVER, code=b""), E.NameInUse)
    # a normal enclave may share a server's name
    p3, h3 = create(d, h, "srv")
    assert h3 == 2
    assert ok(ereq(d, peer, "acquire", name="srv"))["handle"] == s_handle

    # destroy the server: its slot stays taken until its process is reaped
    ok(hreq(d, h, "destroy", handle=s_handle))
    assert has(d.effects, Kill(s_peer)) and has(d.effects, Close(s_peer))
    err(ereq(d, peer, "acquire", name="srv"), E.NoSuchServer)
    err(hreq(d, h, "destroy", handle=s_handle), E.UnknownHandle)
    assert create(d, h, "later")[1] == 3
    d.die(s_peer)
    # now eid 1 is the lowest free slot; its next occupant has generation 1
    p5, h5 = server(d, h, "srv")
    assert h5 == (1 << 32) | 1
    assert ok(ereq(d, peer, "acquire", name="srv"))["handle"] == h5
    # the stale handle does not reach the new server
    err(hreq(d, h, "attest", handle=s_handle, nonce=1), E.UnknownHandle)
    rep = ok(hreq(d, h, "attest", handle=h5, nonce=7))["report"]
    assert rep["name"] == "srv" and rep["nonce"] == 7 and len(rep["sig"]) == 64


def test_reports_and_keys_are_computed_from_the_config_key(d):
    """The core signs with Config.key (an Ed25519 seed) and derives get_key from it:
    pure computation, the same for the same measurement, nothing changed."""
    from tvmrt import verify_report
    h = d.connect()
    p1, h1 = create(d, h, "same")
    p2, _ = create(d, h, "same")                 # same code, name, type: same measurement
    p3, _ = create(d, h, "other")
    before = snapshot(d.core)
    rep = ok(hreq(d, h, "attest", handle=h1, nonce=3))["report"]
    assert ok(ereq(d, p1, "report", nonce=3))["report"] == rep
    verify_report(rep, measurement=measure(NORMAL, "same", b"print(1)"), nonce=3,
                  key=Core(Config(key=KEY)).signer.public_key)
    k = [ok(ereq(d, p, "key", type=t, size=32))["key"] for p in (p1, p2, p3) for t in (0, 1)]
    assert k[0] == k[2] and k[1] == k[3] and len(set(k)) == 4
    assert snapshot(d.core) == before
    other = Driver(Core(Config(key=b"o" * 32)))
    oh = other.connect()
    op_, _ = create(other, oh, "same")
    assert ok(ereq(other, op_, "key", type=0, size=32))["key"] != k[0]
    other.finish()


def test_create_with_shm_window(d):
    h = d.connect()
    rep = ok(hreq(d, h, "shmget", size=4 * PAGE))
    sid, vaddr = rep["id"], rep["vaddr"]
    seg = effects(d, NewSeg)[0].seg
    err(hreq(d, h, "create", name="w", type=NORMAL, code=b"", shm=[sid, 1, PAGE]), E.Unaligned)
    err(hreq(d, h, "create", name="w", type=NORMAL, code=b"", shm=[sid, 0, 0]), E.BadSize)
    err(hreq(d, h, "create", name="w", type=NORMAL, code=b"", shm=[sid, 2 * PAGE, 3 * PAGE]),
        E.BadSize)
    err(hreq(d, h, "create", name="w", type=NORMAL, code=b"", shm=[sid + 99, 0, PAGE]),
        E.UnknownId)
    n = len(d.effects)
    peer, handle = create(d, h, "w", shm=[sid, PAGE, 2 * PAGE])
    (spawn,) = [e for e in d.effects[n:] if type(e) is Spawn]
    assert spawn.shm_seg == seg and spawn.spec["shm"] == [vaddr + PAGE, 2 * PAGE, PAGE]
    assert hreq(d, h, "run", handle=handle) is None
    start = one(d, peer)
    assert start == {"op": "start", "args": [vaddr + PAGE, 2 * PAGE, 0, 0, 0], "g": []}
    # shmctl revokes the id at once; the memory stays while the enclave maps it
    ok(hreq(d, h, "shmctl", id=sid))
    assert effects(d, FreeSeg) == [FreeSeg(seg)]
    assert sid in d.core.regions and d.core.regions[sid].revoked
    assert ereq(d, peer, "exit", v=0) is None
    assert one(d, h)["retval"] == 0
    d.die(peer, how="exited 0")
    assert sid not in d.core.regions
    assert effects(d, FreeSeg) == [FreeSeg(seg)]     # not a second time


# ---------------------------------------------------------------------- run / exit
def test_run_with_schrodinger_window_and_exit(d):
    h = d.connect()
    rep = ok(hreq(d, h, "sget", size=2 * PAGE))
    sid, vaddr = rep["id"], rep["vaddr"]
    seg = ok(hreq(d, h, "sat", id=sid))["g"][0][0]
    peer, handle = create(d, h, "runner")
    err(hreq(d, h, "run", handle=handle, mem=[sid, PAGE, 2 * PAGE]), E.BadSize)
    err(hreq(d, h, "run", handle=handle, mem=[sid, 1, PAGE]), E.Unaligned)
    err(hreq(d, h, "run", handle=handle, mem=[sid, 0, 0]), E.BadSize)
    rid = next(_rids)
    d.message(h, {"op": "run", "rid": rid, "handle": handle, "mem": [sid, PAGE, PAGE]})
    assert d.last_reply is None
    start = one(d, peer)
    assert start == {"op": "start", "args": [0, 0, 0, vaddr + PAGE, PAGE],
                     "g": [[seg, vaddr, 2 * PAGE, 1, "relay"]]}
    assert d.core.regions[sid].owner == peer and d.core.regions[sid].stack == [h]
    # the host cannot touch, free or lend it while the enclave runs
    err(hreq(d, h, "sctl", id=sid), E.RegionLoaned)
    other, oh = create(d, h, "other")
    err(hreq(d, h, "run", handle=oh, mem=[sid, 0, PAGE]), E.RegionLoaned)
    err(hreq(d, h, "run", handle=handle), E.BadState)        # already running
    d.take(h)
    n = len(d.effects)
    assert ereq(d, peer, "exit", v=7) is None
    reply = one(d, h)
    # the region comes back without an fd: the host still maps it
    assert reply == {"op": "r", "rid": rid, "retval": 7,
                     "g": [[seg, vaddr, 2 * PAGE, 0, "relay"]]}
    assert has(d.effects[n:], Kill(peer))
    assert d.core.regions[sid].owner == h and d.core.regions[sid].stack == []
    rep = err(hreq(d, h, "run", handle=handle), E.BadState)   # its tombstone
    assert rep["why"] == "enclave 'runner' has exited with value 7"
    d.die(peer, how="exited 0")
    assert err(hreq(d, h, "attest", handle=handle, nonce=1), E.BadState)["why"] == rep["why"]
    assert d.core.slots[0] is None
    ok(hreq(d, h, "sdt", id=sid))
    ok(hreq(d, h, "sctl", id=sid))


def test_run_server_is_refused(d):
    h = d.connect()
    _, sh = server(d, h)
    err(hreq(d, h, "run", handle=sh), E.BadState)


def test_normal_enclave_fault_reports_to_host(d):
    h = d.connect()
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    peer, handle = create(d, h)
    rid = next(_rids)
    d.message(h, {"op": "run", "rid": rid, "handle": handle, "mem": [sid, 0, PAGE]})
    d.take(h)
    ereq(d, peer, "fault", why="ZeroDivisionError")
    reply = err(one(d, h), E.EnclaveFault)
    assert reply["rid"] == rid and "ZeroDivisionError" in reply["why"]
    # the host never attached it: it owns it again but gets no grant (it maps nothing)
    assert reply["g"] == []
    assert d.core.regions[sid].owner == h
    # a faulted enclave's handle keeps answering with the fault
    for op, kw in (("run", {}), ("attest", {"nonce": 1}), ("destroy", {})):
        rep = err(hreq(d, h, op, handle=handle, **kw), E.EnclaveFault)
        assert "ZeroDivisionError" in rep["why"]


# ---------------------------------------------------------------------- calls
def _world(d, nservers=1):
    h = d.connect()
    servers = [server(d, h, f"s{i + 1}") for i in range(nservers)]
    c, _ = running(d, h, "c")
    return h, c, servers


def test_call_and_return_moves_regions(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    seg = seg_at(d, v)
    assert ok(ereq(d, c, "acquire", name="s1"))["handle"] == sh
    assert call(d, c, sh, [5, 0, v, PAGE, 0, 0]) is None
    msg = one(d, s)
    assert msg == {"op": "call", "a": [5, v, PAGE], "c": d.core.peers[c].enclave.eid,
                   "g": [[seg, v, PAGE, 1, "relay"]]}
    assert owner(d, v) == s and d.core.by_vaddr[v].stack == [c]
    err(ereq(d, c, "unmap", vaddr=v, size=PAGE), E.NotOwned)     # it is on loan
    r = mmap(d, s, 2 * PAGE)
    rseg = seg_at(d, r)
    assert ereq(d, s, "ret", a=[5, 99, v, PAGE, r, 2 * PAGE]) is None
    assert d.take(s) == []
    reply = one(d, c)
    assert reply["op"] == "r" and reply["a"] == [5, 99, v, PAGE, r, 2 * PAGE]
    assert grants(reply) == sorted([(seg, v, PAGE, 0, "relay"),
                                   (rseg, r, 2 * PAGE, 1, "relay")])
    assert owner(d, v) == c and owner(d, r) == c
    # the response region is the caller's now: it may unmap it
    ok(ereq(d, c, "unmap", vaddr=r, size=2 * PAGE))
    assert has(d.effects, FreeSeg(rseg))
    # a call with registers only
    assert call(d, c, sh, [1, 0, 0, 0, 0, 0]) is None
    assert one(d, s) == {"op": "call", "a": [1, 0, 0], "c": 0 + d.core.peers[c].enclave.eid,
                         "g": [], "d": [rseg]}
    ereq(d, s, "ret", a=[1, 2, 0, 0, 0, 0])
    assert one(d, c) == {"op": "r", "rid": ANY, "a": [1, 2, 0, 0, 0, 0], "g": []}


def test_server_returns_the_loan_as_response(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    ereq(d, s, "ret", a=[0, 1, 0, 0, v, PAGE])
    reply = one(d, c)
    assert reply["a"][4:] == [v, PAGE] and grants(reply) == [(seg_at(d, v), v, PAGE, 0, "relay")]
    assert owner(d, v) == c


def test_nested_calls_pass_the_loan_on(d):
    h, c, [(s1, h1), (s2, h2)] = _world(d, 2)
    v = mmap(d, c, PAGE)
    seg = seg_at(d, v)
    call(d, c, h1, [1, 0, v, PAGE, 0, 0])
    assert one(d, s1)["g"] == [[seg, v, PAGE, 1, "relay"]]
    assert call(d, s1, h2, [2, 0, v, PAGE, 0, 0]) is None
    msg = one(d, s2)
    assert msg["a"] == [2, v, PAGE] and msg["g"] == [[seg, v, PAGE, 1, "relay"]]
    assert msg["c"] == d.core.peers[s1].enclave.eid
    assert owner(d, v) == s2 and d.core.by_vaddr[v].stack == [c, s1]
    ereq(d, s2, "ret", a=[2, 20, v, PAGE, 0, 0])
    back = one(d, s1)
    assert back["a"][1] == 20 and back["g"] == [[seg, v, PAGE, 0, "relay"]]
    assert owner(d, v) == s1 and d.core.by_vaddr[v].stack == [c]
    assert d.take(c) == []
    ereq(d, s1, "ret", a=[1, 10, v, PAGE, 0, 0])
    back = one(d, c)
    assert back["a"][1] == 10 and back["g"] == [[seg, v, PAGE, 0, "relay"]]
    assert owner(d, v) == c and d.core.by_vaddr[v].stack == []


def test_call_cycle(d):
    h, c, [(s1, h1), (s2, h2)] = _world(d, 2)
    call(d, c, h1, [0] * 6)
    call(d, s1, h2, [0] * 6)
    d.take(s1), d.take(s2)
    before = snapshot(d.core)
    err(call(d, s2, h1, [0] * 6), E.CallCycle)       # s1 waits on s2
    err(call(d, s2, h2, [0] * 6), E.CallCycle)       # itself
    assert snapshot(d.core) == before
    ereq(d, s2, "ret", a=[0] * 6)
    ereq(d, s1, "ret", a=[0] * 6)
    assert one(d, c)["op"] == "r"


def test_call_cycle_through_a_queued_call(d):
    """s1 is queued on s2 (busy with c2); s2 calling s1 would deadlock: refused at once."""
    h = d.connect()
    (s1, h1), (s2, h2) = server(d, h, "s1"), server(d, h, "s2")
    c1, _ = running(d, h, "c1")
    c2, _ = running(d, h, "c2")
    call(d, c1, h1, [0] * 6)
    call(d, c2, h2, [0] * 6)
    d.take(s1), d.take(s2)
    assert call(d, s1, h2, [0] * 6) is None          # queued behind c2
    (f,) = d.core.peers[s1].enclave.out.values()
    assert f.queued
    before = snapshot(d.core)
    err(call(d, s2, h1, [0] * 6), E.CallCycle)
    assert snapshot(d.core) == before
    ereq(d, s2, "ret", a=[0] * 6)                    # c2 answered, s1's call dispatched
    assert one(d, c2)["op"] == "r"
    assert one(d, s2)["op"] == "call"
    ereq(d, s2, "ret", a=[0] * 6)
    assert one(d, s1)["op"] == "r"
    ereq(d, s1, "ret", a=[0] * 6)
    assert one(d, c1)["op"] == "r"


def test_busy_server_queues_fifo_nb_and_timeout(d):
    h = d.connect()
    s, sh = server(d, h)
    cs = [running(d, h, f"c{i}")[0] for i in range(5)]
    vs = [mmap(d, c, PAGE) for c in cs]
    call(d, cs[0], sh, [0, 0, vs[0], PAGE, 0, 0])
    assert one(d, s)["a"][0] == 0
    for i in (1, 2, 3):
        assert call(d, cs[i], sh, [i, 0, vs[i], PAGE, 0, 0], timeout=10 if i != 2 else 1) is None
        r = d.core.by_vaddr[vs[i]]
        assert r.owner is None and r.stack == [cs[i]]          # in escrow
    # non-blocking: refused at once, its region granted back
    before = snapshot(d.core)
    reply = err(call(d, cs[4], sh, [4, 0, vs[4], PAGE, 0, 0], nb=True), E.ServerBusy)
    assert reply["g"] == [[seg_at(d, vs[4]), vs[4], PAGE, 0, "relay"]]
    assert snapshot(d.core) == before
    # c2's deadline passes while it waits
    assert d.core.next_deadline() == 1.0
    d.tick(0.5)
    assert d.take(cs[2]) == []
    d.tick(1.0)
    reply = err(one(d, cs[2]), E.Timeout)
    assert reply["g"] == [[seg_at(d, vs[2]), vs[2], PAGE, 0, "relay"]]
    assert owner(d, vs[2]) == cs[2]
    # FIFO: c1 then c3; the timed-out call never reaches the server
    ereq(d, s, "ret", a=[0] * 6)
    assert one(d, cs[0])["op"] == "r"
    assert one(d, s)["a"] == [1, vs[1], PAGE]
    ereq(d, s, "ret", a=[1] + [0] * 5)
    assert one(d, cs[1])["op"] == "r"
    assert one(d, s)["a"] == [3, vs[3], PAGE]
    ereq(d, s, "ret", a=[3] + [0] * 5)
    assert one(d, cs[3])["op"] == "r"
    assert d.take(s) == [] and d.core.peers[s].enclave.state == "idle"
    assert d.take(cs[2]) == []
    # and c2 can call again
    call(d, cs[2], sh, [2, 0, vs[2], PAGE, 0, 0])
    assert one(d, s)["a"] == [2, vs[2], PAGE]


def test_server_fault_during_call(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    c2, _ = running(d, h, "c2")
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    call(d, c2, sh, [7, 0, 0, 0, 0, 0])              # queued
    d.take(s)
    assert ereq(d, s, "fault", why="KeyError: 'x'") is None
    reply = err(one(d, c), E.EnclaveFault)
    assert "KeyError" in reply["why"] and reply["g"] == [[seg_at(d, v), v, PAGE, 0, "relay"]]
    # the server survives and serves the next call
    assert d.core.servers["s1"].members[0].peer == s
    assert one(d, s)["a"] == [7, 0, 0]
    ereq(d, s, "ret", a=[7, 8, 0, 0, 0, 0])
    assert one(d, c2)["a"][1] == 8


def test_server_dies_mid_call(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    c2, _ = running(d, h, "c2")
    v2 = mmap(d, c2, PAGE)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    call(d, c2, sh, [0, 0, v2, PAGE, 0, 0])          # queued
    d.take(s)
    own = mmap(d, s, PAGE)
    own_seg = seg_at(d, own)
    d.disconnected(s)
    assert has(d.effects, Kill(s))
    assert d.take(c) == []                  # the core waits for the zygote's report
    d.exited(s)
    reply = err(one(d, c), E.PeerDied)
    assert reply["g"] == [[seg_at(d, v), v, PAGE, 0, "relay"]]
    reply = err(one(d, c2), E.PeerDied)                      # the queued caller too
    assert reply["g"] == [[seg_at(d, v2), v2, PAGE, 0, "relay"]]
    assert has(d.effects, FreeSeg(own_seg))                # the server's own region
    assert owner(d, v) == c and owner(d, v2) == c2
    err(ereq(d, c, "acquire", name="s1"), E.NoSuchServer)
    rep = err(call(d, c, sh, [0] * 6), E.EnclaveFault)       # its tombstone
    assert "signal 9" in rep["why"]
    assert d.core.slots[d.core.peers[c].enclave.eid] is not None
    assert s not in d.core.peers


def test_server_exit_report_before_eof(d):
    """The zygote's report may come first; the core waits for EOF before settling."""
    h, c, [(s, sh)] = _world(d)
    call(d, c, sh, [0] * 6)
    d.take(s)
    d.exited(s, "killed by signal 11")
    assert d.take(c) == []
    d.disconnected(s)
    reply = err(one(d, c), E.PeerDied)
    assert "signal 11" in reply["why"]


def test_caller_dies_mid_call(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    vseg = seg_at(d, v)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    d.die(c)
    assert not has(d.effects, FreeSeg(vseg))               # still on loan to the server
    r = mmap(d, s, PAGE)
    rseg = seg_at(d, r)
    n = len(d.effects)
    assert ereq(d, s, "ret", a=[0, 0, v, PAGE, r, PAGE]) is None
    fx = d.effects[n:]
    assert has(fx, FreeSeg(rseg)) and has(fx, FreeSeg(vseg))
    assert not [e for e in fx if type(e) is Send]
    assert not d.core.regions
    # and the server serves on
    c2, _ = running(d, h, "c2")
    call(d, c2, sh, [0] * 6)
    assert one(d, s)["op"] == "call"


def test_caller_dies_while_queued(d):
    h, c, [(s, sh)] = _world(d)
    c2, _ = running(d, h, "c2")
    v2 = mmap(d, c2, PAGE)
    call(d, c, sh, [0] * 6)
    call(d, c2, sh, [0, 0, v2, PAGE, 0, 0])
    d.take(s)
    seg2 = seg_at(d, v2)
    d.die(c2)
    assert has(d.effects, FreeSeg(seg2))
    assert v2 not in d.core.by_vaddr and not d.core.timers
    ereq(d, s, "ret", a=[0] * 6)
    assert one(d, c)["op"] == "r"
    assert d.take(s) == []                                   # nothing dispatched


def test_host_disconnect_kills_enclaves_and_frees_regions(d):
    h = d.connect()
    other = d.connect()
    sid = ok(hreq(d, h, "shmget", size=PAGE))["id"]
    ok(hreq(d, h, "shmat", id=sid))
    rid_ = ok(hreq(d, h, "sget", size=2 * PAGE))["id"]
    ok(hreq(d, h, "sat", id=rid_))
    s, sh = server(d, h, "hs")
    c, _ = running(d, h, "c", mem=[rid_, 0, 2 * PAGE])
    c2, _ = running(d, h, "c2")
    v = mmap(d, c2, PAGE)
    call(d, c2, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    mmap(d, s, PAGE)
    # a server of another host keeps a call from this host's enclave
    s9, h9 = server(d, other, "os", callers="*")
    call(d, c, h9, [0, 0, d.core.regions[rid_].vaddr, 2 * PAGE, 0, 0])
    d.take(s9)
    d.disconnected(h)
    for e in (s, c, c2):
        assert has(d.effects, Kill(e))
    assert "hs" not in d.core.servers and "os" in d.core.servers
    # the schrodinger region is still with the other host's server
    assert d.core.regions[rid_].owner == s9
    for e in (s, c, c2):
        d.die(e)
    ereq(d, s9, "ret", a=[0] * 6)
    assert d.take(s9) == []
    assert not d.core.regions                               # the loan had nowhere to go
    news = [e.seg for e in effects(d, NewSeg)]
    frees = [e.seg for e in effects(d, FreeSeg)]
    assert sorted(news) == sorted(frees)                    # each exactly once
    d.finish()


def test_shutdown_frees_everything(d):
    h = d.connect()
    ok(hreq(d, h, "shmget", size=PAGE))
    s, sh = server(d, h)
    c, _ = running(d, h)
    v = mmap(d, c, PAGE)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.shutdown()
    assert not d.core.regions
    assert sorted(e.seg for e in effects(d, NewSeg)) == sorted(
        e.seg for e in effects(d, FreeSeg))
    for e in (s, c):
        assert has(d.effects, Kill(e))


# ---------------------------------------------------------------------- bad arguments
def _unchanged(d, peer, msg, exc):
    before = snapshot(d.core)
    reply = ereq(d, peer, msg.pop("op"), **msg) if peer not in d.hosts else \
        hreq(d, peer, msg.pop("op"), **msg)
    err(reply, exc)
    assert snapshot(d.core) == before, msg


def test_bad_arguments_have_distinct_codes_and_change_nothing(d):
    h = d.connect()
    h2 = d.connect()
    s, sh = server(d, h, "s1")
    c, ch = running(d, h, "c")
    other, _ = running(d, h, "o")
    v = mmap(d, c, 2 * PAGE)
    ov = mmap(d, other, PAGE)
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    shm = ok(hreq(d, h, "shmget", size=PAGE))["id"]
    nid = ok(hreq(d, h, "create", name="n", type=NORMAL, code=b""))["handle"]
    cases = [
        # not owned
        (c, {"op": "call", "handle": sh, "a": [0, 0, ov, PAGE, 0, 0]}, E.NotOwned),
        (c, {"op": "call", "handle": sh, "a": [0, 0, ARENAS["mmap"][0] + (1 << 30), PAGE,
                                               0, 0]}, E.NotOwned),
        (c, {"op": "unmap", "vaddr": ov, "size": PAGE}, E.NotOwned),
        # unaligned
        (c, {"op": "call", "handle": sh, "a": [0, 0, v + 8, PAGE, 0, 0]}, E.Unaligned),
        (h, {"op": "run", "handle": nid, "mem": [sid, 8, PAGE]}, E.Unaligned),
        # sizes: zero, huge, not a page multiple, partial
        (c, {"op": "mmap", "size": 0}, E.BadSize),
        (c, {"op": "mmap", "size": 1 << 60}, E.BadSize),
        (c, {"op": "mmap", "size": PAGE + 1}, E.BadSize),
        (h, {"op": "shmget", "size": 0}, E.BadSize),
        (h, {"op": "sget", "size": (1 << 64) - 1}, E.BadSize),
        (c, {"op": "call", "handle": sh, "a": [0, 0, v, 0, 0, 0]}, E.BadSize),
        (c, {"op": "call", "handle": sh, "a": [0, 0, v, PAGE, 0, 0]}, E.BadSize),
        (c, {"op": "call", "handle": sh, "a": [0, 0, v, 3 * PAGE, 0, 0]}, E.BadSize),
        (c, {"op": "unmap", "vaddr": v, "size": PAGE}, E.BadSize),
        (h, {"op": "run", "handle": nid, "mem": [sid, 0, 2 * PAGE]}, E.BadSize),
        # unknown handles
        (c, {"op": "call", "handle": 12345, "a": [0] * 6}, E.UnknownHandle),
        (c, {"op": "call", "handle": (1 << 32) | sh, "a": [0] * 6}, E.UnknownHandle),
        (c, {"op": "call", "handle": ch, "a": [0] * 6}, E.UnknownHandle),    # not a server
        (c, {"op": "call", "handle": -1, "a": [0] * 6}, E.UnknownHandle),
        (h, {"op": "run", "handle": 77}, E.UnknownHandle),
        (h, {"op": "destroy", "handle": 1 << 40}, E.UnknownHandle),
        # unknown names and ids
        (c, {"op": "acquire", "name": "nope"}, E.NoSuchServer),
        (c, {"op": "report", "nonce": 1, "name": "nope"}, E.NoSuchServer),
        (h, {"op": "shmat", "id": 5}, E.UnknownId),
        (h, {"op": "sat", "id": shm}, E.UnknownId),
        # another host's enclave
        (h2, {"op": "destroy", "handle": nid}, E.NotPermitted),
        (h2, {"op": "run", "handle": nid}, E.NotPermitted),
        # wrong state
        (h, {"op": "run", "handle": ch}, E.BadState),
        (s, {"op": "ret", "a": [0] * 6}, E.BadState),
        (c, {"op": "ret", "a": [0] * 6}, E.BadState),
        (s, {"op": "exit", "v": 0}, E.BadState),
        # wrong types, missing fields
        (h, {"op": "shmget", "size": "4096"}, E.InvalidArgument),
        (h, {"op": "shmget"}, E.InvalidArgument),
        (h, {"op": "sget", "size": -PAGE}, E.InvalidArgument),
        (h, {"op": "sget", "size": 4096.0}, E.InvalidArgument),
        (h, {"op": "shmat", "id": None}, E.InvalidArgument),
        (h, {"op": "shmat", "id": True}, E.InvalidArgument),
        (h, {"op": "create", "type": NORMAL, "code": b""}, E.InvalidArgument),
        (h, {"op": "create", "name": "x" * 16, "type": NORMAL, "code": b""},
         E.InvalidArgument),
        (h, {"op": "create", "name": "", "type": NORMAL, "code": b""}, E.InvalidArgument),
        (h, {"op": "create", "name": "x", "type": 2, "code": b""}, E.InvalidArgument),
        (h, {"op": "create", "name": "x", "type": NORMAL, "code": "src"}, E.InvalidArgument),
        (h, {"op": "create", "name": "x", "type": NORMAL, "code": b"", "shm": [1, 2]},
         E.InvalidArgument),
        (h, {"op": "create", "name": "x", "type": NORMAL, "code": b"", "path": 5},
         E.InvalidArgument),
        (h, {"op": "run", "handle": "0"}, E.InvalidArgument),
        (h, {"op": "run", "handle": nid, "mem": {"id": sid}}, E.InvalidArgument),
        (h, {"op": "attest", "handle": nid}, E.InvalidArgument),
        (c, {"op": "mmap"}, E.InvalidArgument),
        (c, {"op": "mmap", "size": [PAGE]}, E.InvalidArgument),
        (c, {"op": "unmap", "vaddr": v}, E.InvalidArgument),
        (c, {"op": "acquire", "name": 5}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0] * 5}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0, 0, 0, 0, 0, -1]}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0, 0, 0, 0, 0, 1 << 64]}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": "000000"}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0] * 6, "nb": 1}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0] * 6, "timeout": -1}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0] * 6, "timeout": "1"}, E.InvalidArgument),
        (c, {"op": "call", "handle": sh, "a": [0] * 6, "timeout": float("nan")},
         E.InvalidArgument),
        (c, {"op": "call", "a": [0] * 6}, E.InvalidArgument),
        (c, {"op": "exit", "v": "0"}, E.InvalidArgument),
        (c, {"op": "fault", "why": 3}, E.InvalidArgument),
        (c, {"op": "report", "nonce": -1}, E.InvalidArgument),
        (c, {"op": "key", "type": 2, "size": 32}, E.InvalidArgument),    # ATTEST_KEY
        (c, {"op": "key", "type": "0", "size": 32}, E.InvalidArgument),
        (c, {"op": "key", "size": 32}, E.InvalidArgument),
        (c, {"op": "key", "type": 0, "size": 0}, E.BadSize),
        (c, {"op": "key", "type": 0, "size": 8161}, E.BadSize),
        (c, {"op": "key", "type": 0}, E.InvalidArgument),
        # unknown ops
        (h, {"op": "frobnicate"}, E.LocalProtocolError),
        (h, {"op": "mmap", "size": PAGE}, E.LocalProtocolError),     # an enclave op
        (c, {"op": "frobnicate"}, E.LocalProtocolError),
        (c, {"op": "shmget", "size": PAGE}, E.LocalProtocolError),   # a host op
    ]
    for peer, msg, exc in cases:
        _unchanged(d, peer, dict(msg), exc)
    # codes are distinct
    codes = {exc.code for _, _, exc in cases}
    assert len(codes) == len({exc for _, _, exc in cases})
    # a host error carries the request's rid; one with a bad rid still gets an answer
    d.message(h, {"op": "frobnicate", "rid": "x"})
    assert d.last_reply["c"] == E.LocalProtocolError.code and "rid" not in d.last_reply
    # requests without a valid rid: a rid-less LocalProtocolError, nothing changes
    before = snapshot(d.core)
    for peer, msg in ((h, {"op": "shmget", "size": PAGE}), (c, {"op": "mmap", "size": PAGE}),
                      (h, {"op": "ps", "rid": 0}), (c, {"op": "acquire", "name": "s1",
                                                        "rid": -3}),
                      (c, {"op": "call", "handle": sh, "a": [0] * 6, "rid": True}),
                      (h, {"op": "create", "name": "x", "type": 0, "code": b"", "rid": 1.5}),
                      (h, {"op": "ps", "rid": 1 << 64})):
        d.message(peer, msg)
        rep = err(d.last_reply, E.LocalProtocolError)
        assert "rid" not in rep, rep
    assert snapshot(d.core) == before
    # an unknown op with a valid rid is answered to that rid
    d.message(c, {"op": "nope", "rid": 77})
    assert err(d.last_reply, E.LocalProtocolError)["rid"] == 77


def test_stale_handle_after_slot_reuse(d):
    h = d.connect()
    c, _ = running(d, h, "c")
    s, sh = server(d, h, "s")
    assert sh == 1
    ok(hreq(d, h, "destroy", handle=sh))
    d.die(s)
    s2, sh2 = server(d, h, "s")
    assert sh2 == (1 << 32) | 1                       # same slot, next generation
    before = snapshot(d.core)
    err(call(d, c, sh, [0] * 6), E.UnknownHandle)
    err(hreq(d, h, "destroy", handle=sh), E.UnknownHandle)
    assert snapshot(d.core) == before
    call(d, c, sh2, [0] * 6)
    assert one(d, s2)["op"] == "call"


def test_bad_return_gives_the_loan_back(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    mine = mmap(d, c, PAGE)                            # the caller's, not the server's
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    assert ereq(d, s, "ret", a=[0, 1, 0, 0, mine, PAGE])["c"] == E.BadReturn.code
    reply = err(one(d, c), E.BadReturn)
    assert reply["g"] == [[seg_at(d, v), v, PAGE, 0, "relay"]]
    assert owner(d, v) == c and owner(d, mine) == c
    assert d.core.peers[s].enclave.state == "idle"
    # an address nobody owns, and the server serves on
    call(d, c, sh, [0] * 6)
    d.take(s)
    err(ereq(d, s, "ret", a=[0, 0, 0, 0, 0x1234000, PAGE]), E.BadReturn)
    err(one(d, c), E.BadReturn)


def test_unmap(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, 3 * PAGE)
    seg = seg_at(d, v)
    assert ok(ereq(d, c, "unmap", vaddr=v, size=3 * PAGE))["d"] == [seg]
    assert has(d.effects, FreeSeg(seg))
    err(ereq(d, c, "unmap", vaddr=v, size=3 * PAGE), E.NotOwned)
    # the address is reused for a new segment
    v2 = ok(ereq(d, c, "mmap", size=PAGE))
    assert v2["vaddr"] == v and v2["g"][0][0] != seg and v2["g"][0][3] == 1
    # a region the server mapped and the caller frees: the server's unmap rides on its next
    # message, before a grant that may reuse the address
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    ereq(d, s, "ret", a=[0] * 6)
    d.take(c)
    vseg = seg_at(d, v)
    ok(ereq(d, c, "unmap", vaddr=v, size=PAGE))
    v3 = mmap(d, c, PAGE)
    assert v3 == v
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    msg = one(d, s)
    assert msg["d"] == [vseg] and msg["g"] == [[seg_at(d, v), v, PAGE, 1, "relay"]]


def test_quota(d):
    d.core = new_core(max_regions=2, max_bytes=3 * PAGE)
    h, c, _ = _world(d)
    mmap(d, c, PAGE)
    mmap(d, c, PAGE)
    before = snapshot(d.core)
    err(ereq(d, c, "mmap", size=PAGE), E.QuotaExceeded)
    assert snapshot(d.core) == before


def test_segment_failure_undoes_the_region(d):
    h, c, _ = _world(d)
    before = snapshot(d.core)
    d.fail_next_seg = True
    err(ereq(d, c, "mmap", size=PAGE), E.NoMemory)
    after = snapshot(d.core)
    assert after["regions"] == before["regions"] and after["arenas"] == before["arenas"]
    d.fail_next_seg = True
    err(hreq(d, h, "shmget", size=PAGE), E.NoMemory)
    assert not d.core.regions
    mmap(d, c, PAGE)


def test_spawn_failure_reaps_the_enclave(d):
    h = d.connect()
    d.fail_next_spawn = True
    n = len(d.effects)
    rep = err(hreq(d, h, "create", name="bad", type=NORMAL, code=b""), E.EnclaveFault)
    assert "could not start" in rep["why"]
    (spawn,) = [e for e in d.effects[n:] if type(e) is Spawn]
    assert spawn.peer not in d.core.peers
    assert create(d, h, "good")[1] == (1 << 32)        # slot 0, next generation


def test_messages_from_gone_peers_are_ignored(d):
    h, c, [(s, sh)] = _world(d)
    ereq(d, c, "exit", v=0)
    d.take(h)
    assert d.core.message(c, {"op": "mmap", "size": PAGE}) == []
    d.disconnected(h)
    assert d.core.message(h, {"op": "ps", "rid": 1}) == []
    assert d.core.disconnected(h) == []
    assert d.core.exited(12345, "?") == [] and d.core.disconnected(12345) == []


def test_segment_failure_keeps_pending_unmaps(d):
    """The shell discards the reply queued before a segment failed; the unmaps that rode
    on it must reach the peer with the error instead (else it keeps a freed segment)."""
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c, PAGE)
    vseg = seg_at(d, v)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    ereq(d, s, "ret", a=[0] * 6)
    d.take(c)
    ok(ereq(d, c, "unmap", vaddr=v, size=PAGE))          # the server still maps it
    assert d.core.peers[s].drops == [vseg]
    d.fail_next_seg = True
    reply = err(ereq(d, s, "mmap", size=PAGE), E.NoMemory)
    assert reply.get("d") == [vseg]
    assert vseg not in d.mapped[s]


def test_loan_returns_to_the_nearest_live_lender(d):
    """c -> s1 -> s2 with c's region passed on; s1 dies: c gets PeerDied at once, and the
    region when s2 returns, in an unsolicited grant, at the same address."""
    h, c, [(s1, h1), (s2, h2)] = _world(d, 2)
    v = mmap(d, c, PAGE)
    seg = seg_at(d, v)
    call(d, c, h1, [0, 0, v, PAGE, 0, 0])
    d.take(s1)
    call(d, s1, h2, [0, 0, v, PAGE, 0, 0])
    d.take(s2)
    d.die(s1)
    reply = err(one(d, c), E.PeerDied)
    assert reply["g"] == []                                   # s2 still has it
    assert owner(d, v) == s2 and d.core.by_vaddr[v].stack == [c]     # s1 is skipped
    ereq(d, s2, "ret", a=[0] * 6)
    assert d.take(s2) == []
    assert one(d, c) == {"op": "grant", "g": [[seg, v, PAGE, 0, "relay"]]}
    assert owner(d, v) == c and d.core.by_vaddr[v].stack == []
    ok(ereq(d, c, "unmap", vaddr=v, size=PAGE))


# ---------------------------------------------------------------------- purity and shape
def test_core_imports_no_io_modules():
    """The core is sans-IO: importing it pulls in neither ctypes, socket nor msgpack."""
    import subprocess
    import sys
    probe = ("import sys, tvmrt.monitor.core; "
             "bad = {'ctypes', 'socket', 'msgpack'} & set(sys.modules); "
             "assert not bad, sorted(bad)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr


def test_core_modules_import_only_pure_modules():
    """What the core's own modules import (read from their source)."""
    import ast
    from pathlib import Path
    allowed = {"__future__", "hashlib", "hmac", "collections", "collections.abc", "typing",
               "dataclasses", "tvmrt", "tvmrt._layout", "tvmrt.errors", "tvmrt._attest"}
    mon = Path(C.__file__).parent
    attest = Path(C.__file__).parents[1] / "tvmrt" / "_attest.py"
    # tvmrt._attest (signing, key derivation) is pure too: hashing, JSON, cryptography's
    # primitives, the error tree
    crypto = {"cryptography.exceptions", "cryptography.hazmat.primitives",
              "cryptography.hazmat.primitives.asymmetric.ed25519",
              "cryptography.hazmat.primitives.kdf.hkdf",
              "cryptography.hazmat.primitives.serialization", "json", "errors"}
    for path in [mon / n for n in ("core.py", "config.py", "effects.py", "schema.py")] + [
            attest]:
        name = path.name
        ok_here = allowed | crypto if path == attest else allowed
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module] if node.level and path == attest else (
                    [] if node.level else [node.module])
            else:
                continue
            for m in mods:
                assert m in ok_here, f"{name} imports {m}"


def test_docstring_lists_every_effect():
    import re

    from tvmrt.monitor import effects as fx_mod
    doc = C.__doc__
    section = doc[doc.index("Effects:"):doc.index("Every change of ownership")]
    listed = set(re.findall(r"^\s{4}([A-Z][A-Za-z]+)\(", section, re.M))
    defined = {c.__name__ for c in fx_mod.ALL}
    src = open(C.__file__).read()
    used = {n for n in defined if re.search(rf"\b{n}\(", src)}
    assert listed == defined == used


def test_core_needs_a_config_with_a_key():
    with pytest.raises(TypeError):
        Core(key=KEY)                                   # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Config(key=b"")
    with pytest.raises(TypeError):
        Config()                                        # type: ignore[call-arg]


def test_illegal_transitions_are_refused(d):
    h = d.connect()
    peer, handle = create(d, h, "n")
    e = d.core.peers[peer].enclave
    with pytest.raises(C.CoreBug):
        d.core._set_state(e, C.SERVING)
    v = None
    c, _ = running(d, h, "c")
    v = mmap(d, c)
    r = d.core.by_vaddr[v]
    with pytest.raises(C.CoreBug):
        d.core._lend(r, h, c)                          # h does not own it
    with pytest.raises(C.CoreBug):
        d.core._take(r, c)                             # not in escrow
    assert set(C.TRANSITIONS) == {C.STARTING, C.CREATED, C.RUNNING, C.IDLE, C.SERVING, C.DONE}


# ---------------------------------------------------------------------- v2: calls
def test_several_outstanding_calls_from_one_enclave(d):
    h = d.connect()
    (s1, h1), (s2, h2) = server(d, h, "s1"), server(d, h, "s2")
    c, _ = running(d, h, "c")
    v1, v2 = mmap(d, c), mmap(d, c)
    d.message(c, {"op": "call", "rid": 501, "handle": h1, "a": [1, 0, v1, PAGE, 0, 0]})
    d.message(c, {"op": "call", "rid": 502, "handle": h2, "a": [2, 0, v2, PAGE, 0, 0]})
    d.message(c, {"op": "call", "rid": 503, "handle": h1, "a": [3, 0, 0, 0, 0, 0]})   # queued
    assert set(d.core.peers[c].enclave.out) == {501, 502, 503}
    # a rid still in use is refused
    d.message(c, {"op": "call", "rid": 502, "handle": h2, "a": [0] * 6})
    assert "rid" not in err(d.last_reply, E.LocalProtocolError)   # not to the first call
    assert one(d, s1)["a"][0] == 1 and one(d, s2)["a"][0] == 2
    ereq(d, s2, "ret", a=[2, 22, v2, PAGE, 0, 0])
    rep = one(d, c)
    assert rep["rid"] == 502 and rep["a"][1] == 22 and grants(rep)[0][1] == v2
    ereq(d, s1, "ret", a=[1, 11, v1, PAGE, 0, 0])
    rep = one(d, c)
    assert rep["rid"] == 501 and rep["a"][1] == 11
    assert one(d, s1)["a"][0] == 3                     # the queued one now
    ereq(d, s1, "ret", a=[3, 33, 0, 0, 0, 0])
    assert one(d, c)["rid"] == 503
    assert not d.core.peers[c].enclave.out


def test_cycle_detection_walks_every_outgoing_call(d):
    h = d.connect()
    (s1, h1), (s2, h2), (s3, h3) = (server(d, h, n) for n in ("s1", "s2", "s3"))
    c, _ = running(d, h, "c")
    call(d, c, h1, [0] * 6)
    d.take(s1)
    call(d, s1, h3, [0] * 6)          # s1 waits for s3 (one thread) ...
    call(d, s1, h2, [0] * 6)          # ... and for s2 (another)
    d.take(s2), d.take(s3)
    before = snapshot(d.core)
    err(call(d, s2, h1, [0] * 6), E.CallCycle)
    err(call(d, s3, h1, [0] * 6), E.CallCycle)
    assert snapshot(d.core) == before
    # s2 returns while s1 still waits for s3: s1 may not return yet
    ereq(d, s2, "ret", a=[0] * 6)
    d.take(s1)
    err(ereq(d, s1, "ret", a=[0] * 6), E.BadState)
    ereq(d, s3, "ret", a=[0] * 6)
    d.take(s1)
    ereq(d, s1, "ret", a=[0] * 6)
    assert one(d, c)["op"] == "r"


@pytest.mark.parametrize("why", ["cycle", "unknown", "notserver", "busy", "badsize"])
def test_refused_call_regrants_the_request_region(d, why):
    h = d.connect()
    s, sh = server(d, h, "s")
    c, ch = running(d, h, "c")
    other, _ = running(d, h, "o")
    v = mmap(d, c, 2 * PAGE)
    seg = seg_at(d, v)
    handle, size, kw = sh, 2 * PAGE, {}
    if why == "busy":
        call(d, other, sh, [0] * 6)
        kw = {"nb": True}
    elif why == "unknown":
        handle = 0xDEAD
    elif why == "notserver":
        handle = ch
    elif why == "badsize":
        size = PAGE
    elif why == "cycle":
        call(d, c, sh, [0] * 6)
        d.take(s)
        ereq(d, s, "ret", a=[0] * 6)
        d.take(c)
        # s serving c, and c... calls s again from another thread while s calls c? use s
        call(d, c, sh, [0] * 6)
        d.take(s)
        handle = d.core.peers[s].enclave.handle
        v = mmap(d, s, PAGE)
        seg, size = seg_at(d, v), PAGE
        before = snapshot(d.core)
        rep = err(call(d, s, handle, [0, 0, v, size, 0, 0]), E.CallCycle)
        assert rep["g"] == [[seg, v, size, 0, "relay"]]
        assert snapshot(d.core) == before
        return
    before = snapshot(d.core)
    rep = call(d, c, handle, [0, 0, v, size, 0, 0], **kw)
    assert rep["op"] == "e" and rep["g"] == [[seg, v, 2 * PAGE, 0, "relay"]], rep
    assert snapshot(d.core) == before


def test_refused_run_regrants_an_attached_schrodinger_region(d):
    h = d.connect()
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    seg = ok(hreq(d, h, "sat", id=sid))["g"][0][0]
    vaddr = d.core.regions[sid].vaddr
    _, sh = server(d, h, "s")
    rep = err(hreq(d, h, "run", handle=sh, mem=[sid, 0, PAGE]), E.BadState)
    assert rep["g"] == [[seg, vaddr, PAGE, 0, "relay"]]
    rep = err(hreq(d, h, "run", handle=0xBEEF, mem=[sid, 0, PAGE]), E.UnknownHandle)
    assert rep["g"] == [[seg, vaddr, PAGE, 0, "relay"]]
    ok(hreq(d, h, "sdt", id=sid))
    rep = err(hreq(d, h, "run", handle=sh, mem=[sid, 0, PAGE]), E.BadState)
    assert "g" not in rep                                 # detached: nothing to restore


def test_call_timeout_while_dispatched(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c)
    seg = seg_at(d, v)
    d.message(c, {"op": "call", "rid": 900, "handle": sh, "a": [0, 0, v, PAGE, 0, 0],
                  "timeout": 2})
    assert one(d, s)["op"] == "call"
    assert d.core.next_deadline() == 2.0
    d.tick(1.0)
    assert d.take(c) == []
    d.tick(1.5)
    rep = err(one(d, c), E.Timeout)
    assert rep["rid"] == 900 and not rep.get("g")        # the loan is still with s
    assert owner(d, v) == s and d.core.next_deadline() is None
    # the caller may call again (another server is busy ... s is): a new call queues
    r = mmap(d, s, PAGE)
    rseg = seg_at(d, r)
    n = len(d.effects)
    ereq(d, s, "ret", a=[0, 5, v, PAGE, r, PAGE])         # late: discarded
    assert one(d, c) == {"op": "grant", "g": [[seg, v, PAGE, 0, "relay"]]}
    assert has(d.effects[n:], FreeSeg(rseg))              # the response region is freed
    assert owner(d, v) == c and d.core.peers[s].enclave.state == "idle"


def test_call_timeout_then_server_dies(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0], timeout=1)
    d.take(s)
    d.tick(2)
    err(one(d, c), E.Timeout)
    d.die(s)
    assert one(d, c) == {"op": "grant", "g": [[seg_at(d, v), v, PAGE, 0, "relay"]]}


def test_server_returns_while_its_nested_call_timed_out(d):
    """A -> S1 -> S2 with A's region lent on; S1's call to S2 times out and S1 returns to A:
    the region skips S1 and goes straight to A when S2 returns."""
    h, a, [(s1, h1), (s2, h2)] = _world(d, 2)
    v = mmap(d, a)
    seg = seg_at(d, v)
    call(d, a, h1, [0, 0, v, PAGE, 0, 0])
    d.take(s1)
    call(d, s1, h2, [0, 0, v, PAGE, 0, 0], timeout=1)
    d.take(s2)
    d.tick(1.5)
    err(one(d, s1), E.Timeout)
    ereq(d, s1, "ret", a=[0, 1, 0, 0, 0, 0])
    rep = one(d, a)
    assert rep["op"] == "r" and rep["g"] == []             # still with s2
    assert d.core.by_vaddr[v].stack == [a]
    ereq(d, s2, "ret", a=[0] * 6)
    assert d.take(s1) == []
    assert one(d, a) == {"op": "grant", "g": [[seg, v, PAGE, 0, "relay"]]}
    assert owner(d, v) == a


def test_run_timeout(d):
    h = d.connect()
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    seg = ok(hreq(d, h, "sat", id=sid))["g"][0][0]
    vaddr = d.core.regions[sid].vaddr
    peer, handle = create(d, h)
    d.message(h, {"op": "run", "rid": 700, "handle": handle, "mem": [sid, 0, PAGE],
                  "timeout": 3})
    d.take(peer)
    d.tick(3)
    rep = err(one(d, h), E.Timeout)
    assert rep["rid"] == 700
    assert d.core.regions[sid].owner == peer               # the enclave goes on
    ereq(d, peer, "exit", v=9)
    assert one(d, h) == {"op": "grant", "g": [[seg, vaddr, PAGE, 0, "relay"]]}
    assert d.core.regions[sid].owner == h


def test_exit_with_outstanding_calls(d):
    h = d.connect()
    (s1, h1), (s2, h2) = server(d, h, "s1"), server(d, h, "s2")
    c, _ = running(d, h, "c")
    busy, _ = running(d, h, "b")
    call(d, busy, h2, [0] * 6)
    v1, v2 = mmap(d, c), mmap(d, c)
    seg2 = seg_at(d, v2)
    call(d, c, h1, [0, 0, v1, PAGE, 0, 0])                # running
    call(d, c, h2, [0, 0, v2, PAGE, 0, 0])                # queued
    d.take(s1), d.take(s2)
    ereq(d, c, "exit", v=4)
    assert one(d, h)["retval"] == 4
    assert v2 not in d.core.by_vaddr and has(d.effects, FreeSeg(seg2))   # withdrawn
    assert owner(d, v1) == s1
    n = len(d.effects)
    ereq(d, s1, "ret", a=[0] * 6)                          # finishes; its loan is freed
    assert v1 not in d.core.by_vaddr
    assert not [e for e in d.effects[n:] if type(e) is Send and e.peer == c]
    ereq(d, s2, "ret", a=[0] * 6)
    assert one(d, busy)["op"] == "r"
    assert d.take(s2) == []                               # the withdrawn call never comes


# ---------------------------------------------------------------------- v2: create
def test_create_is_answered_at_ready(d):
    d.auto_ready = False
    h = d.connect()
    d.message(h, {"op": "create", "rid": 40, "name": "n", "type": NORMAL, "code": b"x"})
    assert d.last_reply is None
    (spawn,) = effects(d, Spawn)
    e = d.core.peers[spawn.peer].enclave
    assert e.state == C.STARTING
    err(hreq(d, h, "run", handle=e.handle), E.BadState)
    d.ready(spawn.peer)
    rep = one(d, h)
    assert rep["op"] == "r" and rep["rid"] == 40 and rep["handle"] == e.handle
    assert e.state == C.CREATED
    err(ereq(d, spawn.peer, "ready"), E.BadState)          # once only


def test_calls_to_a_starting_server_queue(d):
    h = d.connect()
    c, _ = running(d, h, "c")
    d.auto_ready = False
    d.message(h, {"op": "create", "rid": 41, "name": "s", "type": SERVER, "code": b"x"})
    sp = effects(d, Spawn)[-1].peer
    # registered at once: a second server of that name is refused now
    err(hreq(d, h, "create", name="s", type=SERVER, code=b""), E.NameInUse)
    sh = ok(ereq(d, c, "acquire", name="s"))["handle"]
    err(call(d, c, sh, [0] * 6, nb=True), E.ServerBusy)
    assert call(d, c, sh, [7, 0, 0, 0, 0, 0]) is None
    assert d.take(sp) == []
    d.ready(sp)
    assert one(d, h)["rid"] == 41
    assert one(d, sp)["a"] == [7, 0, 0]


@pytest.mark.parametrize("how", ["fault", "die", "timeout", "fault-c"])
def test_create_fails_before_ready(d, how):
    h = d.connect()
    c, _ = running(d, h, "c")
    d.auto_ready = False
    d.message(h, {"op": "create", "rid": 42, "name": "s", "type": SERVER, "code": b"x(",
                  "timeout": 5})
    sp = effects(d, Spawn)[-1].peer
    sh = d.core.peers[sp].enclave.handle
    call(d, c, sh, [0] * 6)                                # queued on the starting server
    if how == "fault":
        ereq(d, sp, "fault", why="SyntaxError: '(' was never closed")
        rep = err(one(d, h), E.EnclaveFault)
        assert "SyntaxError" in rep["why"]
    elif how == "fault-c":
        ereq(d, sp, "fault", why="no main", c=E.BadExitValue.code)
        err(one(d, h), E.BadExitValue)
    elif how == "die":
        d.die(sp, how="exited with status 1")
        rep = err(one(d, h), E.EnclaveFault)
        assert "status 1" in rep["why"]
    else:
        d.tick(4)
        assert d.take(h) == []
        d.tick(1)
        err(one(d, h), E.Timeout)
        assert has(d.effects, Kill(sp))
    assert one(d, c)["c"] in (E.PeerDied.code,)
    assert "s" not in d.core.servers
    d.die(sp)


def test_stdio_decision(d):
    h = d.connect()
    for nfds, want in ((2, "message"), (0, "null")):
        n = len(d.effects)
        d.message(h, {"op": "create", "rid": next(_rids), "name": "x", "type": NORMAL,
                      "code": b""}, nfds=nfds)
        ok(d.last_reply)
        (spawn,) = [e for e in d.effects[n:] if type(e) is Spawn]
        assert spawn.stdio == want
    before = snapshot(d.core)
    d.message(h, {"op": "create", "rid": next(_rids), "name": "x", "type": NORMAL,
                  "code": b""}, nfds=1)
    err(d.last_reply, E.InvalidArgument)
    assert snapshot(d.core) == before


# ---------------------------------------------------------------------- v2: faults, tombstones
@pytest.mark.parametrize("c,cls", [(None, E.EnclaveFault), (-17, E.EnclaveFault),
                                   (-31, E.BadExitValue), (-25, E.BadReturn),
                                   (-13, E.EnclaveFault), ("x", E.EnclaveFault)])
def test_fault_codes(d, c, cls):
    h, cl, [(s, sh)] = _world(d)
    kw = {} if c is None else {"c": c}
    call(d, cl, sh, [0] * 6)
    d.take(s)
    ereq(d, s, "fault", why="bad thing", **kw)              # in a call: the server survives
    rep = err(one(d, cl), cls)
    assert "bad thing" in rep["why"]
    peer, handle = create(d, h, "n")
    d.message(h, {"op": "run", "rid": 88, "handle": handle})
    d.take(peer)
    ereq(d, peer, "fault", why="main said no", **kw)
    rep = err(one(d, h), cls)
    assert rep["rid"] == 88 and "main said no" in rep["why"]
    assert err(hreq(d, h, "attest", handle=handle, nonce=1), cls)["why"] == rep["why"]


def test_tombstones(d):
    h = d.connect()
    other = d.connect()
    c, _ = running(d, h, "c")
    ended = {}
    p1, h1 = running(d, h, "ex")
    ereq(d, p1, "exit", v=3)
    ended[h1] = (E.BadState, "enclave 'ex' has exited with value 3")
    p2, h2 = running(d, h, "ft")
    ereq(d, p2, "fault", why="ZeroDivisionError: boom")
    ended[h2] = (E.EnclaveFault, "enclave 'ft': ZeroDivisionError: boom")
    p3, h3 = create(d, h, "ds")
    ok(hreq(d, h, "destroy", handle=h3))
    ended[h3] = (E.UnknownHandle, "enclave 'ds' was destroyed by its host")
    p4, h4 = server(d, h, "kl")
    d.die(p4, how="killed by signal 9")
    ended[h4] = (E.EnclaveFault, "enclave 'kl': killed by signal 9")
    d.take(h)
    for p in (p1, p2, p3):
        d.die(p)
    for handle, (cls, why) in ended.items():
        for op, kw in (("run", {}), ("attest", {"nonce": 1}), ("destroy", {})):
            rep = err(hreq(d, h, op, handle=handle, **kw), cls)
            assert rep["why"] == why, (op, rep)
        rep = err(call(d, c, handle, [0] * 6), cls)
        assert rep["why"] == why
        # another host's request learns nothing
        err(hreq(d, other, "attest", handle=handle, nonce=1), E.UnknownHandle)
    # slots are reused with the next generation; the tombstones stay with the old handles
    p5, h5 = create(d, h, "new")
    assert h5 & 0xFFFFFFFF in {x & 0xFFFFFFFF for x in ended}
    ok(hreq(d, h, "attest", handle=h5, nonce=1))
    d.disconnected(h)
    assert not d.core.tombs


def test_tombstones_are_bounded():
    d = Driver(new_core(max_tombstones=2))
    h = d.connect()
    handles = []
    for i in range(4):
        p, handle = create(d, h, f"e{i}")
        ok(hreq(d, h, "destroy", handle=handle))
        d.die(p)
        handles.append(handle)
    assert len(d.core.tombs) == 2
    assert "destroyed" in err(hreq(d, h, "run", handle=handles[3]), E.UnknownHandle)["why"]
    assert "destroyed" not in err(hreq(d, h, "run", handle=handles[0]),
                                  E.UnknownHandle)["why"]
    d.check()


# ---------------------------------------------------------------------- v2: schrodinger states
SCHRODINGER_OPS = ("sat", "sdt", "sctl", "run", "finish")


def _schrodinger_step(d, h, sid, peer_handle, model, op):
    """Apply ``op``; check the reply against the (owner, attached) model; return it."""
    owner_, attached, running_ = model["owner"], model["attached"], model["running"]
    if owner_ == "gone":
        if op in ("sat", "sdt", "sctl"):
            err(hreq(d, h, op, id=sid), E.UnknownId)
        return
    if op == "sat":
        rep = hreq(d, h, "sat", id=sid)
        if owner_ != "host":
            err(rep, E.RegionLoaned)
        elif attached:
            err(rep, E.BadState)
        else:
            assert ok(rep)["g"][0][3] == 1
            model["attached"] = True
    elif op == "sdt":
        rep = hreq(d, h, "sdt", id=sid)
        if not attached:
            err(rep, E.BadState)
        else:
            assert ok(rep)["d"] == [d.core.regions[sid].seg]
            model["attached"] = False
    elif op == "sctl":
        rep = hreq(d, h, "sctl", id=sid)
        if owner_ != "host":
            err(rep, E.RegionLoaned)
        elif attached:
            err(rep, E.BadState)
        else:
            ok(rep)
            model["owner"] = "gone"
    elif op == "run":
        if running_:
            return
        peer, handle = create(d, h, "r")
        rid = next(_rids)
        d.message(h, {"op": "run", "rid": rid, "handle": handle, "mem": [sid, 0, PAGE]})
        if owner_ != "host":
            err(d.last_reply, E.RegionLoaned)
            ok(hreq(d, h, "destroy", handle=handle))
            d.die(peer)
            return
        assert d.last_reply is None
        d.take(peer)
        model.update(owner="enclave", running=(peer, rid))
    elif op == "finish":
        if not running_:
            return
        peer, rid = running_
        ereq(d, peer, "exit", v=1)
        rep = one(d, h)
        assert rep["rid"] == rid and rep["retval"] == 1
        seg = d.core.regions[sid].seg
        if attached:
            assert rep["g"] == [[seg, d.core.regions[sid].vaddr, PAGE, 0, "relay"]]
        else:
            assert rep["g"] == []                 # a detached region stays detached
        d.die(peer)
        model.update(owner="host", running=None)
    assert d.core.regions.get(sid) is None or (
        (d.core.regions[sid].owner == h) == (model["owner"] == "host"))


@pytest.mark.parametrize("seq", list(itertools.product(SCHRODINGER_OPS, repeat=4)))
def test_schrodinger_attach_detach_ctl_run_in_every_order(seq):
    d = Driver(new_core())
    h = d.connect()
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    model = {"owner": "host", "attached": False, "running": None}
    for op in seq:
        _schrodinger_step(d, h, sid, None, model, op)
        d.check()
    d.finish()


def test_shm_attach_states(d):
    h = d.connect()
    sid = ok(hreq(d, h, "shmget", size=PAGE))["id"]
    err(hreq(d, h, "shmdt", id=sid), E.BadState)
    ok(hreq(d, h, "shmat", id=sid))
    err(hreq(d, h, "shmat", id=sid), E.BadState)
    err(hreq(d, h, "shmctl", id=sid), E.BadState)
    assert ok(hreq(d, h, "shmdt", id=sid))["d"] == [d.core.regions[sid].seg]
    ok(hreq(d, h, "shmctl", id=sid))


# ---------------------------------------------------------------------- v2: the shell's reports
def test_segment_tampered_kills_the_violator(d):
    h, c, [(s, sh)] = _world(d)
    v = mmap(d, c)
    seg = seg_at(d, v)
    call(d, c, sh, [0, 0, v, PAGE, 0, 0])
    d.take(s)
    c2, _ = running(d, h, "c2")
    call(d, c2, sh, [5, 0, 0, 0, 0, 0])                   # queued behind c
    d.tamper.add(seg)                                      # s resized it
    n = len(d.effects)
    ereq(d, s, "ret", a=[0] * 6)
    fx = d.effects[n:]
    assert has(fx, Kill(s)) and has(fx, FreeSeg(seg))
    rep = err(one(d, c), E.IsolationViolation)
    assert rep["g"] == [] and rep["d"] == [seg]           # nobody gets the segment
    assert v not in d.core.by_vaddr
    err(one(d, c2), E.IsolationViolation)                  # whoever waited on s
    rep = err(call(d, c, sh, [0] * 6), E.IsolationViolation)    # its tombstone
    assert "violation" in rep["why"]
    d.die(s)


def test_segment_tampered_by_a_host_disconnects_it(d):
    h = d.connect()
    sid = ok(hreq(d, h, "sget", size=PAGE))["id"]
    seg = ok(hreq(d, h, "sat", id=sid))["g"][0][0]
    peer, handle = create(d, h)
    d.tamper.add(seg)
    d.message(h, {"op": "run", "rid": 5, "handle": handle, "mem": [sid, 0, PAGE]})
    assert h in d.closed and has(d.effects, Kill(peer))
    assert not d.core.regions


def test_segment_creation_is_answered_after_its_result(d):
    h, c, _ = _world(d)
    fx = d.core.message(c, {"op": "mmap", "rid": 61, "size": PAGE}, 0, 0.0)
    assert [type(e) for e in fx] == [NewSeg]                # no reply before the result
    seg = fx[0].seg
    d.live[seg] = PAGE
    d.created.append(seg)
    d.hold[seg] = c
    fx2 = d.core.segment_created(seg)
    (send,) = fx2
    assert send.msg["rid"] == 61 and send.msg["g"][0][:2] == [seg, send.msg["vaddr"]]
    d.pending[c][61] += 1
    d._apply(fx2)
    fx = d.core.message(c, {"op": "mmap", "rid": 62, "size": PAGE}, 0, 0.0)
    d.failed.add(fx[0].seg)
    (send,) = d.core.segment_failed(fx[0].seg, "ENOSPC")
    assert send.msg["op"] == "e" and send.msg["rid"] == 62 and "ENOSPC" in send.msg["why"]
    assert d.core.segment_failed(fx[0].seg, "again") == []


def test_eof_grace_is_a_core_deadline(d):
    h, c, _ = _world(d)
    d.now = 10.0
    d.exited(c, "exited with status 0")
    assert d.core.next_deadline() == 11.0 and c in d.core.peers
    d.tick(0.5)
    assert c in d.core.peers
    n = len(d.effects)
    d.tick(0.6)
    assert has(d.effects[n:], Close(c)) and c not in d.core.peers
    rep = err(one(d, h), E.EnclaveFault)
    assert "status 0" in rep["why"]
    d.open.discard(c)
    # EOF in time: no deadline left behind
    c2, _ = running(d, h, "c2")
    d.exited(c2)
    d.disconnected(c2)
    assert d.core.next_deadline() is None


def test_quotas_are_per_host_process_across_its_connections():
    """More connections from one process do not buy more enclaves, regions or bytes;
    another process has its own quota; the account goes with the process's last
    connection and region."""
    d = Driver(new_core(max_enclaves=2, max_regions=2, max_bytes=3 * PAGE))
    a1 = d.connect(pid=4242)
    a2 = d.connect(pid=4242)                # the same host process, a second connection
    b = d.connect(pid=4343)
    create(d, a1, "a")
    create(d, a2, "b")
    err(hreq(d, a1, "create", name="c", type=NORMAL, code=b""), E.QuotaExceeded)
    err(hreq(d, a2, "create", name="c", type=NORMAL, code=b""), E.QuotaExceeded)
    create(d, b, "c")                       # another process is not affected
    ok(hreq(d, a1, "shmget", size=2 * PAGE))
    err(hreq(d, a2, "shmget", size=2 * PAGE), E.QuotaExceeded)       # bytes, shared
    ok(hreq(d, a2, "shmget", size=PAGE))
    err(hreq(d, a1, "shmget", size=PAGE), E.QuotaExceeded)           # regions, shared
    ok(hreq(d, b, "shmget", size=2 * PAGE))
    d.disconnected(a1)
    key = ("host", 1000, 4242)
    assert key in d.core.accounts               # a2 still holds its region
    d.disconnected(a2)
    assert key not in d.core.accounts           # nothing charged any more: forgotten
    d.check()


def test_an_enclave_has_its_own_region_quota():
    d = Driver(new_core(max_regions=1))
    h = d.connect()
    ok(hreq(d, h, "shmget", size=PAGE))
    c, _ = running(d, h, "c")
    mmap(d, c)                                  # not charged to its host
    err(ereq(d, c, "mmap", size=PAGE), E.QuotaExceeded)
    d.check()


def test_calls_in_flight_and_queued_callers_are_bounded():
    d = Driver(new_core(max_calls_out=2, max_queue=1))
    h = d.connect()
    s, sh = server(d, h, "srv")
    c, _ = running(d, h, "c")
    c2, _ = running(d, h, "c2")
    v = mmap(d, c)
    assert call(d, c, sh, [1, 0, 0, 0, 0, 0]) is None          # dispatched
    assert call(d, c, sh, [2, 0, 0, 0, 0, 0]) is None          # queued (1 of 1)
    err(call(d, c2, sh, [3, 0, 0, 0, 0, 0]), E.QuotaExceeded)  # the queue is full
    rep = err(call(d, c, sh, [4, 0, v, PAGE, 0, 0]), E.QuotaExceeded)   # 2 in flight
    assert grants(rep) == [(seg_at(d, v), v, PAGE, 0, "relay")]  # the loan comes back
    assert owner(d, v) == c
    d.check()


def test_enclave_quota_is_per_host():
    d = Driver(new_core(max_enclaves=2, max_enclaves_total=3))
    h1, h2 = d.connect(), d.connect()
    create(d, h1, "a")
    create(d, h1, "b")
    err(hreq(d, h1, "create", name="c", type=NORMAL, code=b""), E.QuotaExceeded)
    create(d, h2, "c")                     # another host is not affected
    err(hreq(d, h2, "create", name="d", type=NORMAL, code=b""), E.QuotaExceeded)   # global
    d.check()


def test_servers_are_callable_by_their_host_process_unless_opened():
    """Authority: by default only enclaves of the host process that created a server may
    acquire or call it (a connection of the same process counts as the same host); to
    anyone else it looks exactly like a server that does not exist.  ``callers`` opens
    it: "*" to every enclave, or a list of enclave names and measurements (a list
    replaces the default)."""
    d = Driver(Core(Config(key=b"k" * 32)))
    h, other = d.connect(), d.connect()
    h_again = d.connect(pid=d.core.peers[h].pid)
    s, sh = server(d, h, "mine")
    for host_, name in ((h, "c1"), (h_again, "c2"), (other, "c3")):
        running(d, host_, name)
    c1, c2, c3 = (next(p for p, q in d.core.peers.items() if q.kind == C.ENCLAVE
                       and q.enclave.name == n) for n in ("c1", "c2", "c3"))

    def acquire(c, name):
        return ereq(d, c, "acquire", name=name)

    assert ok(acquire(c1, "mine"))["handle"] == sh
    assert ok(acquire(c2, "mine"))["handle"] == sh
    nope, ghost = acquire(c3, "mine"), acquire(c3, "no-such")
    assert nope["c"] == ghost["c"] == E.NoSuchServer.code
    assert nope["why"].replace("mine", "X") == ghost["why"].replace("no-such", "X")
    # an asynchronous call by name likewise
    asyn = ereq(d, c3, "asyn", name="mine", arg=1, vaddr=0, size=0)
    assert asyn["c"] == E.NoSuchServer.code and asyn["why"] == nope["why"]
    # a guessed handle is refused as an unknown one
    assert ereq(d, c3, "call", handle=sh, a=[0] * 6)["c"] == E.UnknownHandle.code
    # opened by name, by measurement, to all
    server(d, h, "named", callers=["c3"])
    server(d, h, "measured", callers=[d.core.peers[c1].enclave.measurement])
    server(d, h, "open", callers="*")
    assert ok(acquire(c3, "named")) and ok(acquire(c3, "open"))
    assert ok(acquire(c1, "measured"))
    assert acquire(c3, "measured")["c"] == E.NoSuchServer.code   # another measurement
    assert acquire(c1, "named")["c"] == E.NoSuchServer.code      # not on the list
    for bad in ("x", ["a" * 65], [b"short"], [1], ["a"] * 65):
        assert hreq(d, h, "create", name="bad", type=SERVER, code=b"s",
                    callers=bad)["c"] == E.InvalidArgument.code
    assert hreq(d, h, "create", name="n", type=NORMAL, code=b"s",
                callers="*")["c"] == E.InvalidArgument.code


def test_split_is_refused_in_strict_mode():
    """The two halves of a split region share one file, which strict mode's check (no
    other process maps the segment's file) would take for a violation: refused."""
    d = Driver(Core(Config(key=b"k" * 32, isolation="strict")))
    h = d.connect()
    c, _ = running(d, h, "c")
    v = mmap(d, c, 2 * PAGE)
    rep = ereq(d, c, "split", vaddr=v, size=2 * PAGE, at=v + PAGE)
    assert rep["c"] == E.NotPermitted.code and "strict" in rep["why"]


def _strict_host_with_a_schrodinger_region():
    d = Driver(Core(Config(key=b"k" * 32, isolation="strict")))
    h = d.connect()
    sid = hreq(d, h, "sget", size=PAGE)["id"]
    return d, h, sid


def test_strict_a_held_grant_is_not_recorded_until_it_goes():
    """Strict mode: an attach whose reply waits for an ended enclave's process (it had
    the region) to be reaped is not counted as mapped meanwhile: a detach is refused
    (the host maps nothing yet), and the reply goes, with its grant, once the process
    is reaped (the driver checks the core's record against the host's at every step)."""
    d, h, sid = _strict_host_with_a_schrodinger_region()
    hd = hreq(d, h, "create", name="n", type=NORMAL, code=b"n")["handle"]
    assert d.message(h, {"op": "run", "rid": 90, "handle": hd, "mem": [sid, 0, PAGE]})
    e = next(iter(d.procs))
    d.message(h, {"op": "destroy", "rid": 91, "handle": hd})    # the region comes back
    d.check()
    d.message(h, {"op": "sat", "rid": 92, "id": sid})
    assert d.last_reply is None and d.core.held                  # the killed one lives
    assert d.core.regions[sid].seg not in d.core.peers[h].segs
    assert hreq(d, h, "sdt", id=sid)["c"] == E.BadState.code
    d.check()
    d.die(e)
    rep = d.inbox[h][-1]
    assert rep["rid"] == 92 and rep["op"] == "r" and rep["g"][0][4] == "remap"
    d.check()
    d.finish()


def test_strict_a_host_keeping_a_mapping_after_detach_is_checked_at_the_next_grant():
    """Strict mode: a host that detached a schrodinger region stays one of its mappers
    (a past holder): lending it to a run checks the host's maps, and a host that kept
    a mapping is cut off before the enclave gets the region."""
    d, h, sid = _strict_host_with_a_schrodinger_region()
    hreq(d, h, "sat", id=sid)
    seg = d.core.regions[sid].seg
    hreq(d, h, "sdt", id=sid)
    d.cheat.add((h, seg))
    hd = hreq(d, h, "create", name="n", type=NORMAL, code=b"n")["handle"]
    d.message(h, {"op": "run", "rid": 90, "handle": hd, "mem": [sid, 0, PAGE]})
    assert d.violations == 1 and h not in d.core.peers and sid not in d.core.regions
    d.check()
    d.finish()


def test_a_resume_whose_idle_server_takes_a_queued_call_of_the_chain_stops_nothing_again(d):
    """c -> s2 -> s1, stopped at c; s1's return and s2's second call to s1 were in
    flight (s1 idles stopped, the call queues).  The resume continues s1 before s2 (slot
    order): s1 takes s2's call then, and must not be stopped again on behalf of the
    stop that is over (found by the strict model test; both modes)."""
    h, c, [(s1, h1), (s2, h2)] = _world(d, 2)
    call(d, c, h2, [0] * 6)
    call(d, s2, h1, [0] * 6)
    d.take(s1), d.take(s2)
    ch = d.core.peers[c].enclave.handle
    assert ok(hreq(d, h, "stop", handle=ch))["stopped"]
    ereq(d, s1, "ret", a=[0] * 6)
    call(d, s2, h1, [0] * 6)
    assert len(d.core.peers[s1].enclave.queue) == 1
    assert ok(hreq(d, h, "resume", handle=ch))["resumed"]
    assert all(d.core.peers[p].enclave.stopped_by is None for p in (c, s1, s2))
    assert d.core.peers[s1].enclave.state == C.SERVING and not d.stopped
