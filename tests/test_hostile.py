"""Issue 7's hostile eapps, live: one test per behaviour the issue lists.

Each test starts a real hostile eapp (``tests/eapps/``) on a real monitor and checks:

(a) what the hostile enclave experiences -- the tvmrt error it gets, or that it is
    killed and why;
(b) that an innocent caller/server pair (``pair_caller`` / ``pair_server``: a region
    filled with random bytes, CRC-checked and inverted by the server, every byte checked
    when it comes back) calls throughout and every one of its calls is correct;
(c) that the monitor still answers (``ps``);
(d) that nothing leaked: no enclave process, no region or segment left in the monitor
    (its own count: segments are memfds, so /dev/shm is checked too but says little),
    the monitor's fds back to their idle count (the ``World`` fixtures).

The monitors are private to this module, one per mode (default ``mprotect`` and
``--isolation strict``, sandboxed; strict without sandbox for ``/proc/self/mem``): an
attack that got through must not take the session's monitor down with it.
"""
from __future__ import annotations

import importlib.util
import os
import resource
import threading
import time

import psutil
import pytest

from conftest import (
    eapp,
    enclave_procs,
    monitor_fds,
    private_monitor,
    shm_names,
    wait_until,
)
from tvmrt import _sandbox
from tvmrt.errors import (
    BadReturn,
    CallCycle,
    EnclaveFault,
    InvalidArgument,
    IsolationViolation,
    NotOwned,
    PeerDied,
    QuotaExceeded,
    RegionLoaned,
    ServerBusy,
    Timeout,
)
from tvmrt.host import SERVER, Host

pytestmark = pytest.mark.timeout(120)

STATE = _sandbox.level(_sandbox.probe())


# ---------------------------------------------------------------------- monitors
def _settled_fds(mon) -> int:
    """The monitor's fd count once it is idle (it closes its ready pipe just after
    saying it listens): the same figure three times in a row."""
    counts = [monitor_fds(mon)]
    while len(counts) < 3 or counts[-1] != counts[-2] or counts[-2] != counts[-3]:
        time.sleep(0.05)
        counts.append(monitor_fds(mon))
    return counts[-1]


def _monitor(**kw):
    """A private monitor started with the usual soft limit on open files (1,024),
    whatever this test run has: one enclave's ``eapp_mmap`` flood within its own quota
    must not starve the others of the monitor's fds (the monitor raises its soft limit
    to the hard one)."""
    gen = private_monitor(**kw)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        mon = next(gen)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    mon.idle_fds = _settled_fds(mon)
    yield mon
    for _ in gen:               # the monitor's own teardown and its checks
        pass


@pytest.fixture(scope="module")
def mprotect_mon():
    yield from _monitor(isolation="mprotect")


@pytest.fixture(scope="module")
def strict_mon():
    yield from _monitor(isolation="strict")


@pytest.fixture(scope="module")
def strict_nosandbox_mon():
    yield from _monitor(isolation="strict", sandbox=False)


@pytest.fixture(scope="module")
def mprotect_nosandbox_mon():
    yield from _monitor(isolation="mprotect", sandbox=False)


class World:
    """A host on one private monitor, and the leak check around a test."""

    def __init__(self, mon):
        self.mon = mon
        assert wait_until(lambda: not enclave_procs(mon)
                          and monitor_fds(mon) == mon.idle_fds, 20), \
            "the previous test left the monitor busy"
        self.host = Host.connect(mon.path, embedded=False)

    def alive(self) -> None:
        """(c): the monitor process lives and answers ``ps``."""
        assert self.mon.proc.poll() is None, "the monitor died"
        assert self.host.ps()["monitor"]["pid"] == self.mon.pid

    def close(self) -> None:
        """(d): the host's enclaves end with it; nothing of them may stay."""
        self.host.close()
        mon = self.mon
        assert wait_until(lambda: not enclave_procs(mon), 20), \
            f"enclave processes left: {enclave_procs(mon)}"
        assert wait_until(lambda: monitor_fds(mon) == mon.idle_fds, 20), \
            f"monitor fds grew from {mon.idle_fds} to {monitor_fds(mon)}"
        assert not shm_names(mon.pid), f"segments left in /dev/shm: {shm_names(mon.pid)}"
        # segments are memfds, never in /dev/shm: the monitor's own count says more
        # (an enclave killed with its host is forgotten once its process is reaped)
        with Host.connect(mon.path, embedded=False) as h:
            assert wait_until(lambda: not (i := h.ps())["enclaves"] and not i["regions"]
                              and i["monitor"]["segments"] == 0, 20), h.ps()


def _world_on(mon, mode=None):
    """A World on ``mon``, closed after the test."""
    w = World(mon)
    if mode is not None:
        w.mode = mode
    yield w
    w.close()


def _run_behind(enc, timeout):
    """Run ``enc`` on a thread: (the thread, a dict that gets ``out``: its return value
    or the exception its run raised)."""
    ran: dict = {}

    def run():
        try:
            ran["out"] = enc.run(timeout=timeout)
        except Exception as exc:
            ran["out"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, ran


@pytest.fixture(params=["mprotect", "strict"])
def world(request):
    """A World on the module's monitor of the parametrized transfer mode."""
    yield from _world_on(request.getfixturevalue(f"{request.param}_mon"), request.param)


@pytest.fixture
def mprotect_world(mprotect_mon):
    yield from _world_on(mprotect_mon)


@pytest.fixture
def strict_world(strict_mon):
    yield from _world_on(strict_mon)


@pytest.fixture
def strict_nosandbox_world(strict_nosandbox_mon):
    yield from _world_on(strict_nosandbox_mon)


@pytest.fixture
def mprotect_nosandbox_world(mprotect_nosandbox_mon):
    yield from _world_on(mprotect_nosandbox_mon)


# ---------------------------------------------------------------------- the innocent pair
class Pair:
    """(b): server "pair" and a caller lending it a checksummed region in a loop, in a
    thread of this process, until :meth:`finish`."""

    def __init__(self, host: Host):
        self.host = host
        self.server = host.create(eapp("pair_server"), name="pair", type=SERVER)
        self.shm = host.shmget(0x1000)
        self.v = self.shm.view.cast("q")
        self.caller = host.create(eapp("pair_caller"), name="pair-caller", shm=self.shm)
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.v[2] >= 3, 30), f"the pair does not call: {self.counts}"
        #: the address of the caller's region (a target for hostile enclaves)
        self.region = self.v[1]

    def _run(self):
        try:
            self.result["rv"] = self.caller.run(timeout=120)
        except Exception as exc:            # reported by finish()
            self.result["exc"] = exc

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """(correct, wrong data, failed calls, last failure code)."""
        return tuple(self.v[2:6])

    def pid(self, which: str = "server") -> int:
        name = "pair" if which == "server" else "pair-caller"
        return next(e["pid"] for e in self.host.ps()["enclaves"] if e["name"] == name)

    def mark(self) -> int:
        return self.v[2]

    def finish(self, since: int) -> None:
        """Stop the loop; every call was correct, and at least 3 more were made after
        ``since`` (a count taken before the attack: the pair worked through it)."""
        assert wait_until(lambda: self.v[2] >= since + 3, 30), \
            f"the pair stopped calling during the attack: {self.counts}"
        self.v[0] = 1
        self.thread.join(60)
        assert not self.thread.is_alive(), "the pair's caller did not finish"
        assert self.result == {"rv": 0}, self.result
        ok, bad, failed, code = self.counts
        assert (bad, failed) == (0, 0), f"the pair was hurt: {self.counts}"
        assert ok >= since + 3


@pytest.fixture
def pair_of():
    pairs = []

    def make(world):
        p = Pair(world.host)
        pairs.append(p)
        return p
    yield make
    for p in pairs:                  # a failed test: stop the loop before the leak check
        p.v[0] = 1
        p.thread.join(60)


def _shm(host, n=64):
    """A page of shared memory for a hostile eapp's parameters and results (int64s)."""
    shm = host.shmget(0x1000)
    return shm, shm.view.cast("q")


def _load(name):
    """A test eapp's module, for the constants it shares with its test."""
    spec = importlib.util.spec_from_file_location(f"{name}_eapp", eapp(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- 5. calls itself
def test_an_enclave_that_calls_itself_gets_call_cycle_and_the_pair_carries_on(world,
                                                                              pair_of):
    """A server calling its own name (directly, with one instance or with another
    instance idle), an A -> B -> A cycle, and an asynchronous call to itself: each is
    refused at once with CallCycle, nothing hangs, and the servers serve on."""
    pair = pair_of(world)
    h = world.host
    h.create(eapp("cycle_server"), name="ping", type=SERVER)
    h.create(eapp("cycle_server"), name="pong", type=SERVER)
    h.create(eapp("cycle_server"), name="self2", type=SERVER, instances=2)
    shm, v = _shm(h)
    since = pair.mark()
    t0 = time.monotonic()
    assert h.create(eapp("cycle_caller"), name="cycle-caller", shm=shm).run(timeout=60) == 0
    assert time.monotonic() - t0 < 30, "a cycle hung until a deadline"
    cc = CallCycle.code
    # [ping calls itself, ping -> pong -> ping, pong -> ping -> pong, an instance of
    # self2 calls self2 (the other instance is idle), ping asyn-calls ping]
    assert list(v[8:13]) == [cc, cc, cc, cc, cc], list(v[8:16])
    assert list(v[13:16]) == [0, 0, 0]      # each call itself came back: rc 0
    # the servers serve on: a plain call to each
    assert list(v[16:19]) == [1, 1, 1]
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 6. holds a call
def test_a_server_that_holds_a_call_forever_times_out_its_callers_and_is_destroyed(
        world, pair_of):
    """A server that never returns: its caller's deadline fires (Timeout, the loan stays
    with the server until it ends), a queued caller with a deadline gets Timeout and its
    region back at once, a non-blocking one ServerBusy, and callers queued without a
    deadline get PeerDied with their regions untouched when the host destroys the
    server; the held region then comes back too, with the server's write in it."""
    pair = pair_of(world)
    h = world.host
    hshm, hv = _shm(h)
    holder = h.create(eapp("holder_server"), name="holder", type=SERVER, shm=hshm)
    since = pair.mark()
    # name: (timeout ms, nonblocking, marker)
    plan = {"held": (1000, 0, 40), "queued-1": (0, 0, 41), "queued-2": (0, 0, 42),
            "queued-deadline": (1000, 0, 43), "nonblocking": (0, 1, 44)}
    views, runs, threads = {}, {}, []
    for name, (ms, nb, marker) in plan.items():
        shm, v = _shm(h)
        v[0], v[1], v[3] = ms, nb, marker
        enc = h.create(eapp("patient_caller"), name=name, shm=shm)
        views[name] = v
        t, runs[name] = _run_behind(enc, 100)
        threads.append(t)
        if name == "held":
            assert wait_until(lambda: hv[0] == 1, 30), "the holder never got the call"
        else:
            assert wait_until(lambda v=v: v[11] == 1, 30)
    # queued callers with a deadline, or none at all, have their answer already
    for name, code, back in (("nonblocking", ServerBusy.code, 44),
                             ("queued-deadline", Timeout.code, 43),
                             ("held", Timeout.code, None)):
        v = views[name]
        assert wait_until(lambda v=v: v[8] != 0, 30), name
        assert v[8] == code, (name, v[8])
        if back is not None:                      # its region came back with the answer
            assert wait_until(lambda v=v: v[9] == 1, 30) and v[10] == back, name
    assert views["held"][9] == 0, "the held region came back while the holder holds it"
    assert views["queued-1"][8] == views["queued-2"][8] == 0     # still waiting
    world.alive()
    holder.destroy()
    for name, marker in (("queued-1", 41), ("queued-2", 42)):
        v = views[name]
        assert wait_until(lambda v=v: v[9] == 1, 30), name
        assert (v[8], v[10]) == (PeerDied.code, marker), (name, list(v[8:11]))
    v = views["held"]
    assert wait_until(lambda: v[9] == 1, 30)
    assert v[10] == 7                             # back, with the holder's write
    for t in threads:
        t.join(60)
    assert {k: r.get("out") for k, r in runs.items()} == {name: 0 for name in plan}, runs
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 1. uses a loan
def _lender(world, mode, lender="loan_keeper"):
    """Server "keeper" and the hostile ``lender`` eapp in ``mode``, the attack made
    while the keeper holds the region with its bytes written (this test relays the
    keeper's word to the lender, and the lender's back: no sleep decides it); returns
    the lender's run outcome (its exit value or exception), its results and the
    keeper's."""
    h = world.host
    kshm, kv = _shm(h)
    h.create(eapp("keeper_server"), name="keeper", type=SERVER, shm=kshm)
    shm, v = _shm(h)
    v[0] = mode
    enc = h.create(eapp(lender), name="lender", shm=shm)
    t, ran = _run_behind(enc, 60)
    try:
        assert wait_until(lambda: kv[0] == 1, 30), "the keeper never got the region"
        v[14] = 1                                   # attack now
        assert wait_until(lambda: v[15] == 1 or "out" in ran, 30), "no attack"
    finally:
        kv[2] = 1                                   # the keeper checks its bytes now
        t.join(60)
    assert "out" in ran, "the lender did not finish"
    # the keeper finishes its call whatever happened to its caller
    assert wait_until(lambda: kv[1] != 0, 30), "the keeper never finished its call"
    return ran["out"], v, kv


def test_a_lender_using_its_loan_through_a_view_gets_value_error_and_the_borrower_keeps_its_data(
        world, pair_of):
    """A checked view taken before the loan raises ValueError while the region is
    away; the borrower's bytes are untouched and the region comes back with them."""
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 0)
    assert out == 0
    assert v[10] == 1                          # ValueError, nothing written
    assert (v[8], v[9], kv[1]) == (0, 1, 1)    # the keeper found its bytes intact
    assert v[11] == 0xA5                       # back, with the keeper's bytes
    pair.finish(since)
    world.alive()


def test_a_lender_writing_its_loan_through_a_raw_pointer_is_killed_and_the_borrower_keeps_its_data(
        world, pair_of):
    """A raw write to the lent page faults the lender (SIGSEGV: PROT_NONE in the
    default mode, no mapping at all in strict mode); only the lender dies, the keeper
    finishes its call with its bytes intact, and the region is freed with the lender."""
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 1)
    assert isinstance(out, EnclaveFault) and "SIGSEGV" in out.reason, out
    assert v[10] == 0                          # the write never completed
    assert kv[1] == 1                          # the keeper's bytes are intact
    world.alive()
    assert wait_until(lambda: not [r for r in world.host.ps()["regions"]
                                   if r["kind"] == "relay" and r["vaddr"] != pair.region],
                      30), "the dead lender's region was not freed"
    pair.finish(since)


def test_a_lender_that_mprotects_its_loan_back_writes_only_anonymous_memory_in_strict_mode(
        strict_world, pair_of):
    """Strict mode unmaps a lent region: ``mprotect`` of the address makes the arena's
    anonymous reservation writable, not the segment; the keeper's bytes are intact, and
    the region comes back (a fresh mapping) with them.  (In the default mode the same
    write lands in the region: docs/security.md, "Not defended".)"""
    world = strict_world
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 2)
    assert out == 0
    assert (v[10], v[12]) == (0, 1)            # mprotect worked, the write stuck here...
    assert (v[8], v[9], kv[1]) == (0, 1, 1)    # ...but not in the keeper's region
    assert v[11] == 0xA5
    pair.finish(since)
    world.alive()


@pytest.mark.skipif("landlock" not in STATE and STATE != "full",
                    reason=f"no Landlock here ({STATE})")
def test_a_lender_cannot_open_proc_self_mem_in_the_sandbox(world, pair_of):
    """Landlock gives an enclave no /proc at all, its own included: /proc/self/mem does
    not open, in either mode."""
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 3)
    assert out == 0
    assert v[10] == 13                         # EACCES
    assert (v[8], v[9], kv[1], v[11]) == (0, 1, 1, 0xA5)
    pair.finish(since)
    world.alive()


def test_a_lender_writing_its_loan_through_proc_self_mem_without_sandbox_misses_in_strict_mode(
        strict_nosandbox_world, pair_of):
    """Without the sandbox /proc/self/mem opens; in strict mode the lent region is not
    mapped in the lender, so a write there reaches only the lender's own anonymous
    reservation (or fails), and a read shows none of the keeper's bytes."""
    world = strict_nosandbox_world
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 3)
    assert out == 0
    assert v[10] == 0                          # it opened
    assert v[13] == 0                          # and saw nothing of the keeper's
    assert (v[8], v[9], kv[1], v[11]) == (0, 1, 1, 0xA5)
    pair.finish(since)
    world.alive()



def test_without_sandbox_a_default_mode_lender_reads_but_cannot_write_its_loan_via_proc_self_mem(
        mprotect_nosandbox_world, pair_of):
    """Known weakness of ``--no-sandbox`` in the default mode (docs/security.md, "Not
    defended"): the lender keeps its mapping at ``PROT_NONE``, and ``/proc/self/mem``
    reads through that protection (the kernel forces the access), so the lender sees
    the keeper's bytes; a write to a shared mapping without write permission is
    refused (EIO) and the keeper's bytes stay intact.  Strict mode has no mapping to
    read (the test above)."""
    world = mprotect_nosandbox_world
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, 3)
    assert out == 0
    assert (v[10], v[13]) == (0, 1)            # it opened, and it read the keeper's bytes
    assert v[12] == 5                          # EIO: no write
    assert (v[8], v[9], kv[1], v[11]) == (0, 1, 1, 0xA5)
    pair.finish(since)
    world.alive()

# ---------------------------------------------------------------------- 2. returns others'
def test_an_enclave_returning_regions_it_never_owned_is_refused_and_the_owner_keeps_them(
        world, pair_of):
    """Freeing, lending, giving away or returning as a response another enclave's region
    (the pair's, busy in its calls) or an address nobody owns: each gets its own clear
    error from the monitor (the runtime's own check bypassed), a borrowing server may
    neither free nor give away the loan it holds, and the pair's calls stay correct."""
    pair = pair_of(world)
    h = world.host
    tshm, tv = _shm(h)
    nobody = 0x2000000000 + 0x0800000000          # the middle of the mmap arena
    tv[0], tv[1], tv[2] = pair.region, 2 * 0x1000, nobody
    h.create(eapp("thief_server"), name="thief", type=SERVER, shm=tshm)
    shm, v = _shm(h)
    v[0], v[1], v[2] = pair.region, 2 * 0x1000, nobody
    since = pair.mark()
    assert h.create(eapp("returner"), name="returner", shm=shm).run(timeout=60) == 0
    no = NotOwned.code
    assert list(v[8:17]) == [no, no, no, no, no, InvalidArgument.code, BadReturn.code,
                             BadReturn.code, no], list(v[8:19])
    # the borrowing thief could neither free nor give away the loan; it came back
    assert (tv[8], tv[9]) == (RegionLoaned.code, RegionLoaned.code), list(tv[8:10])
    assert (v[17], v[18]) == (0, 2)
    regions = {r["vaddr"]: r for r in h.ps()["regions"]}
    assert pair.region in regions and nobody not in regions
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 3. resizes a segment
EPERM = 1


@pytest.mark.parametrize("how", [1, 2], ids=["truncate", "grow"])
def test_a_server_resizing_a_loaned_segment_is_refused_by_its_seal_and_the_caller_keeps_data(
        world, pair_of, how):
    """A borrowing server that kept a dup of the segment fd (it wrapped the runtime's
    mapping function) cannot ``ftruncate`` it: segments are memfds sealed at their
    size (EPERM).  The caller gets its region back whole, never a SIGBUS, and the
    server serves on."""
    pair = pair_of(world)
    h = world.host
    sshm, sv = _shm(h)
    srv = h.create(eapp("resizer"), name="resizer", type=SERVER, shm=sshm)
    shm, v = _shm(h)
    v[0] = how
    since = pair.mark()
    assert h.create(eapp("resize_victim"), name="victim", shm=shm).run(timeout=60) == 0
    assert sv[8] == EPERM
    assert list(v[8:11]) == [0, 2, 5]           # call ok, region back, its int intact
    srv.attest(1)                                # the server lives (nothing to punish)
    pair.finish(since)
    world.alive()


@pytest.mark.parametrize("how", [1, 2], ids=["truncate", "grow"])
def test_a_lender_that_resizes_its_segment_while_lent_is_refused_and_the_borrower_never_gets_sigbus(
        world, pair_of, how):
    """The lender keeps a dup of its region's fd and resizes the segment while the
    keeper holds the region.  Unsealed, a truncation killed the keeper with SIGBUS at
    its next touch (no check at a handoff can prevent that), and a growth got the
    keeper killed at the return as if it had done it; sealed, the ftruncate fails
    (EPERM) and the call completes with the keeper's bytes intact."""
    pair = pair_of(world)
    since = pair.mark()
    out, v, kv = _lender(world, how, lender="resizer")
    assert out == 0
    assert v[10] == EPERM
    assert (v[8], kv[1]) == (0, 1)               # the call completed, the bytes intact
    assert [e["state"] for e in world.host.ps()["enclaves"]
            if e["name"] == "keeper"] == ["idle"]   # the keeper lives and serves
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 4. floods eapp_mmap
ONE_MORE = b'''
from tvmrt.eapp import *

def main(args):
    r = eapp_mmap(0, PAGE)
    return 1 if r and eapp_unmap(r, PAGE) == 0 else 0
'''


@pytest.mark.parametrize("big", [0, 1], ids=["pages", "4GiB-regions"])
def test_an_enclave_flooding_eapp_mmap_hits_its_own_quota_and_its_memory_is_freed_when_destroyed(
        world, pair_of, big):
    """eapp_mmap in a loop: the flooder gets QuotaExceeded at its own per-enclave quota
    (1024 regions, or 8 GiB: two regions of 4 GiB), while other enclaves still get
    regions and the pair calls on; destroying the flooder frees every region (the
    monitor's segment count and fds go back)."""
    pair = pair_of(world)
    h = world.host
    shm, v = _shm(h)
    v[0] = big
    before = h.ps()["monitor"]["segments"]
    since = pair.mark()
    flooder = h.create(eapp("flooder"), name="flooder", shm=shm)
    t, ran = _run_behind(flooder, 100)
    assert wait_until(lambda: v[10] == 1, 90), f"the flood did not end: {v[8]} regions"
    assert v[9] == QuotaExceeded.code
    assert v[8] == (2 if big else 1024) and v[11] == 1
    info = h.ps()
    assert info["monitor"]["segments"] == before + v[8]
    # another enclave still gets a region of its own (its quota is its own)
    assert h.create(ONE_MORE, name="one-more").run(timeout=30) == 1
    world.alive()
    flooder.destroy()
    t.join(30)
    assert isinstance(ran.get("out"), EnclaveFault), ran     # destroyed by its host
    assert wait_until(lambda: h.ps()["monitor"]["segments"] == before, 30), \
        "the flood's segments outlived the flooder"
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 8. the sandbox
@pytest.mark.skipif(STATE != "full", reason=f"this kernel's sandbox is {STATE!r}")
def test_sandbox_attacks_are_refused_while_the_pair_calls_and_its_server_survives(
        mprotect_world, pair_of):
    """tests/eapps/hostile.py's attacks (/proc/<monitor>/fd, /proc/<host>/mem,
    /proc/<other enclave>/maps, kill of the monitor, the zygote and another enclave --
    here the pair's server --, ptrace, /dev/shm, a file in $HOME, ...) while the pair
    calls: each is refused (Landlock: EACCES; signal scoping and seccomp: EPERM), the
    pair's server lives on with the same pid and every call of the pair is correct."""
    from test_sandbox import Targets, _results, _shm_for
    world = mprotect_world
    pair = pair_of(world)
    h = world.host
    h.create(eapp("echo_server"), name="echo", type=SERVER)
    victim = pair.pid("server")
    t = Targets()
    try:
        shm, v = _shm_for(h, 0, world.mon, victim, t)
        since = pair.mark()
        assert h.create(eapp("hostile"), name="hostile", shm=shm).run(timeout=60) == 0
        got = _results(v)
        with open(t.home, "rb") as f:
            assert f.read() == b"secret\n"
        assert not os.path.exists(t.tmp)
    finally:
        t.close()
    for name in ("open /proc/monitor/fd/N", "list /proc/monitor/fd", "read /proc/host/mem",
                 "read /proc/other enclave/maps", "open a file in /dev/shm",
                 "list /dev/shm", "read a file in $HOME"):
        assert got[name] == 13, (name, got)                       # EACCES
    for name in ("kill the monitor", "kill another enclave", "kill the zygote",
                 "ptrace attach the monitor", "process_vm_readv the host"):
        assert got[name] == EPERM, (name, got)
    assert pair.pid("server") == victim and psutil.pid_exists(victim)
    pair.finish(since)
    world.alive()


# ---------------------------------------------------------------------- 7. strict mode
def _kept_fd(world, how, second="cheat"):
    """cheat_server (req_arg ``how``: it keeps a dup of the segment fd and maps it
    after giving the region back) and strict_victim calling it twice, its second call
    to ``second``; returns the victim's results and the cheat's Enclave."""
    h = world.host
    cheat = h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    if second == "honest":
        h.create(eapp("echo_server"), name="honest", type=SERVER)
    shm, v = _shm(h)
    v[0], v[1] = how, second == "honest"
    assert h.create(eapp("strict_victim"), name="victim", shm=shm).run(timeout=60) == 0
    return v, cheat


def test_strict_a_server_mapping_a_kept_fd_after_its_return_is_killed_at_the_regions_next_grant(
        strict_world, pair_of):
    """The gap docs/security.md names: a dup of the segment fd kept *unmapped* when the
    region went back (so the check at that grant passes) and mapped later writes into
    the caller's region while the caller holds it (0x888 below).  At the region's next
    grant the monitor finds the mapping in the cheat's /proc/PID/maps: here the grant
    goes back to the cheat itself, whose check as a receiver covers only the region's
    own address range (where its runtime's fresh mapping would hide a rogue one), so
    the cheat serves the call and is found at the return, the next grant; it is killed
    and the caller gets IsolationViolation with its region back."""
    world = strict_world
    pair = pair_of(world)
    since = pair.mark()
    v, cheat = _kept_fd(world, 14)
    assert list(v[8:11]) == [0, 11, 0x888]            # the window: the write landed
    assert v[11] == IsolationViolation.code           # caught at the next grant
    assert v[12] == 12                                # the region back, the cheat's +1
    with pytest.raises(IsolationViolation):
        cheat.attest(1)
    pair.finish(since)
    world.alive()


def test_strict_a_server_remapping_a_kept_fd_at_the_old_address_is_killed_when_it_goes_elsewhere(
        strict_world, pair_of):
    """A cheat maps its kept fd back at the region's own address (``MAP_FIXED`` over the
    arena's reservation) after giving it up; when the region is next granted to another
    server the monitor finds the mapping, kills the cheat first, then grants."""
    world = strict_world
    pair = pair_of(world)
    since = pair.mark()
    v, cheat = _kept_fd(world, 15, second="honest")
    assert list(v[8:11]) == [0, 11, 0x999]            # the window: the write landed
    assert v[11] == 0 and v[12] == 12                 # the honest call, after the kill
    with pytest.raises(IsolationViolation):
        cheat.attest(1)
    pair.finish(since)
    world.alive()


def test_strict_a_remap_at_the_old_address_is_caught_when_the_region_comes_back_to_the_cheat(
        strict_world, pair_of):
    """A cheat re-maps its kept fd at the region's old address after giving it up, and
    the region's next grant goes back to the cheat itself.  The receiver of a grant is
    checked too (in remap mode it maps nothing of a region before its grant; its
    runtime's fresh mapping would replace the rogue one and hide it): the cheat is
    killed before it gets the region, and the caller gets IsolationViolation with its
    region back -- the cheat's write (0x999) is there, made in the window before the
    check (docs/security.md), the second call's +1 is not."""
    world = strict_world
    pair = pair_of(world)
    since = pair.mark()
    v, cheat = _kept_fd(world, 15)
    assert list(v[8:11]) == [0, 11, 0x999]            # the window: the write landed
    assert v[11] == IsolationViolation.code           # caught at the call's grant
    assert list(v[12:14]) == [11, 0x999]              # the region back, never served
    with pytest.raises(IsolationViolation):
        cheat.attest(1)
    pair.finish(since)
    world.alive()
