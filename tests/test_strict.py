"""Strict transfer mode (``--isolation strict``, DESIGN.md §2 ``remap``) against hostile
eapps, next to the default ``mprotect`` mode.

Each test runs on a private embedded monitor of its mode (a violation must not take the
session's monitor down).  What is shown:

* re-``mprotect`` of a region given up: in the default mode the old mapping is still
  there and the write lands in the caller's region (the mode's known weakness); in
  strict mode nothing of the segment is left at that address, the write lands in
  private anonymous memory and the caller's data is intact;
* a dup of the segment fd, mapped elsewhere and kept: strict mode finds the mapping in
  the holder's ``/proc/PID/maps`` before the next grant, kills it, and the caller gets
  IsolationViolation (with its region back, once the violator is dead); a caller that
  keeps such a mapping of a region it lends is killed before the server gets it;
* ``/proc/self/mem`` cannot be opened (Landlock): refused in both modes;
* afterwards the monitor, the server and other callers carry on.
"""
from __future__ import annotations

import errno
import os

import pytest

from conftest import eapp, enclave_procs, private_monitor, wait_until
from tvmrt import _sandbox
from tvmrt.errors import IsolationViolation
from tvmrt.host import SERVER, Host

IV = IsolationViolation.code
STATE = _sandbox.level(_sandbox.probe())


def _monitor(isolation):
    yield from private_monitor(isolation=isolation)


@pytest.fixture(scope="module")
def strict():
    yield from _monitor("strict")


@pytest.fixture(scope="module")
def default():
    yield from _monitor("mprotect")


def _enclaves(mon):
    return enclave_procs(mon)


@pytest.fixture
def host_of(request):
    hosts = []

    def make(mon):
        h = Host.connect(mon.path, embedded=False)
        hosts.append((h, mon))
        return h
    yield make
    for h, mon in hosts:
        h.close()
        assert wait_until(lambda m=mon: not _enclaves(m), 10), "enclave processes left"


def _call(h, req_arg, cheat=0):
    """One cheat_caller run; returns its results (rc, resp_val, int0, int1) or the
    run's exception."""
    shm = h.shmget(0x1000)
    v = shm.view.cast("i")
    v[0], v[1] = req_arg, cheat
    enc = h.create(eapp("cheat_caller"), name=f"c{req_arg}{cheat}", shm=shm)
    try:
        rv = enc.run(timeout=20)
    except IsolationViolation as exc:
        return exc
    assert rv == 0
    return tuple(v[8:12])


def _honest_pair_works(h):
    """The server and a fresh honest caller still work."""
    assert _call(h, 10) == (0, 11, 11, 0)


def test_remprotect_lands_in_the_caller_in_default_mode(default, host_of):
    h = host_of(default)
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    # the server's write after it gave the region back reaches the caller's data
    assert _call(h, 11) == (0, 12, 11, 0x666)


def test_remprotect_finds_nothing_in_strict_mode(strict, host_of):
    h = host_of(strict)
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    # mprotect of the address succeeds but it is the anonymous reservation there now
    assert _call(h, 11) == (0, 12, 11, 0)
    _honest_pair_works(h)


def test_dup_mapping_is_undetected_in_default_mode(default, host_of):
    h = host_of(default)
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    assert _call(h, 12) == (0, 13, 11, 0x777)


def test_dup_mapping_kills_the_server_in_strict_mode(strict, host_of):
    h = host_of(strict)
    srv = h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    rc, resp, i0, i1 = _call(h, 12)
    # the caller is told, gets its region back (the server's legitimate +1 in it) once
    # the violator is dead, and nothing the server wrote afterwards
    assert (rc, resp, i0, i1) == (IV, 0, 11, 0)
    with pytest.raises(IsolationViolation):
        srv.attest(1)
    # another server of the same name serves the next caller
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    _honest_pair_works(h)


def test_a_caller_keeping_its_lent_region_is_killed_in_strict_mode(strict, host_of):
    h = host_of(strict)
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    got = _call(h, 10, cheat=1)
    assert isinstance(got, IsolationViolation), got
    # the server got the call only after the caller was dead, and serves on
    _honest_pair_works(h)


@pytest.mark.skipif("landlock" not in STATE and STATE != "full",
                    reason=f"no Landlock here ({STATE})")
@pytest.mark.parametrize("mode", ["default", "strict"])
def test_proc_self_mem_is_refused(mode, request, host_of):
    h = host_of(request.getfixturevalue(mode))
    h.create(eapp("cheat_server"), name="cheat", type=SERVER)
    rc, err, i0, _ = _call(h, 13)
    assert rc == 0 and err in (errno.EACCES, errno.EPERM), os.strerror(err)
    assert i0 == 11


# ---------------------------------------------------------------------- the maps check
_HOLDER = r"""
import ctypes, mmap, os, sys
from tvmrt import _memory
fd = int(sys.argv[1])
area = mmap.mmap(-1, 1 << 16)             # where a region would be: its address is told
here = ctypes.addressof(ctypes.c_char.from_buffer(area))
print(os.getpid(), here, flush=True)
keep = []
for line in sys.stdin:
    if line.strip() == "fixed":           # MAP_SHARED | MAP_FIXED at here + 8 KiB
        _memory.map_fixed(here + 8192, 4096, fd)
    else:                                 # MAP_PRIVATE, read-only, wherever
        keep.append(mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
    print("ok", flush=True)
"""


@pytest.mark.parametrize("pmq", [True, False], ids=["procmap_query", "maps_text"])
def test_the_maps_check_finds_any_mapping_and_the_receivers_only_in_its_range(pmq):
    """Daemon._maps_segments on a live process, both ways (PROCMAP_QUERY and, as before
    Linux 6.11, the maps text): a past holder's check finds a mapping of the segment
    anywhere, private and read-only too; the receiver's (``grants``) only one in the
    range its grant names, where its runtime's fresh mapping would replace it (from
    the text, which has no addresses to go by, anywhere)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from tvmrt.monitor import daemon as D

    name = f"tvmrt.{os.getpid()}.7.test{pmq}"
    mfd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(mfd, 4096)
    seg = D._SegFd(mfd, f"/memfd:{name}")
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(mfd)], pass_fds=(mfd,),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, here = map(int, p.stdout.readline().split())
        shell = SimpleNamespace(maps={}, _pmq=pmq, _log=lambda text: None)
        check = D.Daemon._maps_segments.__get__(shell)
        segs = [(7, seg)]
        grant = [[7, here + 8192, 4096, 1, "remap"]]
        other = [[7, here + 16384, 4096, 1, "remap"]]

        def do(how):
            p.stdin.write(how + "\n")
            p.stdin.flush()
            assert p.stdout.readline() == "ok\n"

        assert check(1, pid, segs) is None and check(1, pid, segs, grant) is None
        do("private")
        assert check(1, pid, segs) == (1, 7)              # a read-only snoop: found
        # elsewhere: found at the next grant (the text has no addresses to go by: a
        # receiver's check reads it all, and finds it now)
        elsewhere = None if pmq else (1, 7)
        assert check(1, pid, segs, grant) == elsewhere
        do("fixed")
        assert check(1, pid, segs, grant) == (1, 7)       # at the region's address: now
        assert check(1, pid, segs, other) == elsewhere
        assert shell._pmq == pmq                          # (no fallback on this kernel)
    finally:
        p.kill()
        p.wait()
        seg.close_fd()
