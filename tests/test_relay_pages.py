"""Relay pages, the rest: eapp_return_relay_page and rerun, asyn_enclave_call, and the
relay_page and mem demos -- real enclave processes on the session monitor."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from conftest import eapp, wait_until
from tvmrt import SERVER
from tvmrt.errors import (
    BadSize,
    BadState,
    InvalidArgument,
    NoSuchServer,
    NotOwned,
    Unaligned,
    UnknownHandle,
)

pytestmark = pytest.mark.timeout(60)


def _relay(host, shm_value=None):
    sch = host.schrodinger_get(0x2000)
    page = sch.view.cast("i")
    page[0] = 22222
    shm = None
    if shm_value is not None:
        shm = host.shmget(0x1000)
        shm.view.cast("i")[0] = shm_value
    enc = host.create(eapp("relay_return"), name="rr", shm=shm)
    enc.set_mem_arg(sch)
    return enc, sch, page


# ---------------------------------------------------------------- return_relay_page / rerun
def test_host_edits_the_page_between_runs_and_the_enclave_sees_it(host):
    enc, sch, page = _relay(host)
    addr = sch.address
    assert enc.run() == 1 and enc.relay_returned
    assert sch.owned and page[1] == 7           # the enclave's write, the host's page again
    page[0] = 41                                # the host edits it
    enc.set_rerun_arg(1)
    assert enc.run() == 5 and not enc.relay_returned
    assert enc.retval == 5
    assert sch.address == addr
    assert list(page[2:5]) == [42, 1, 0]        # saw the edit, same address, rc 0


def test_the_page_can_go_back_twice(host):
    enc, sch, page = _relay(host, shm_value=2)
    assert enc.run() == 1
    page[0] = 1
    enc.set_rerun_arg(1)
    assert enc.run() == 1 and page[1] == 8 and page[2] == 2
    assert enc.run() == 5                       # the rerun arg stays set, as on Penglai
    assert page[2] == 102


def test_rerun_needs_reason_1_and_a_returned_page(host):
    enc, sch, page = _relay(host)
    enc.set_rerun_arg(1)
    with pytest.raises(BadState):               # not returned: nothing to rerun
        enc.run()
    enc.set_rerun_arg(0)
    assert enc.run() == 1
    with pytest.raises(BadState):               # a plain run of a paused enclave
        enc.run()
    enc.set_rerun_arg(2)
    with pytest.raises(InvalidArgument):
        enc.run()
    assert sch.owned                            # a refused rerun leaves the page here
    page[0] = 9
    enc.set_rerun_arg(1)
    assert enc.run() == 5 and page[2] == 10


def test_destroy_while_the_page_is_back_leaks_nothing(host):
    enc, sch, page = _relay(host)
    assert enc.run() == 1
    enc.destroy()
    assert sch.owned
    page[0] = 3                                 # still the host's memory
    enc.set_rerun_arg(1)
    with pytest.raises(UnknownHandle):
        enc.run()
    sch.remove()
    assert wait_until(lambda: not host.ps()["regions"], 5)


def test_return_without_a_relay_page_still_returns_1(host):
    enc = host.create(eapp("no_relay_return"), name="nrr")
    assert enc.run() == 1
    enc.set_rerun_arg(1)
    assert enc.run() == 10


def test_penglai_run_returns_1_and_set_rerun_arg_continues(clean):
    code = r'''
import ctypes, sys
from tvmrt.penglai import *
open_device(sys.argv[1])
elf = elf_args(); elf_args_init(elf, sys.argv[2])
enc = PLenclave(); PLenclave_init(enc)
params = enclave_args(); enclave_args_init(params); params.name = "rr"
sid = PLenclave_schrodinger_get(0x1000); addr = PLenclave_schrodinger_at(sid, 0)
ctypes.c_int.from_address(addr).value = 5
assert PLenclave_create(enc, elf, params) == 0
PLenclave_set_mem_arg(enc, sid, 0, 0x1000)
print("run", PLenclave_run(enc), ctypes.c_int.from_address(addr + 4).value)
ctypes.c_int.from_address(addr).value = 99
PLenclave_set_rerun_arg(enc, 1)
print("run", PLenclave_run(enc), enc.user_param.retval,
      ctypes.c_int.from_address(addr + 8).value)
close_device()
'''
    out = subprocess.run([sys.executable, "-c", code, clean.path, eapp("relay_return")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["run 1 7", "run 0 5 100"]


# ---------------------------------------------------------------- asyn_enclave_call
def _asyn(host, scenario, server=True):
    log = host.shmget(0x1000)
    if server:
        host.create(eapp("asyn_server"), name="asyn", type=SERVER, shm=log)
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    v[0] = scenario
    enc = host.create(eapp("asyn_caller"), name="acaller", shm=shm)
    return enc, v, log.view.cast("i")


def test_asyn_call_is_delivered_and_the_region_is_the_servers(host):
    enc, v, log = _asyn(host, 0)
    assert enc.run() == 0
    rc, still_ours, my_eid = v[16:19]
    assert rc == 0 and still_ours == 0
    assert wait_until(lambda: log[0] == 1, 5)
    assert list(log[1:5]) == [1, 41, 0x2000, my_eid]
    # the caller has exited: the region lives on, the server's
    regions = host.ps()["regions"]
    assert [r["size"] for r in regions if r["kind"] == "relay"] == [0x2000]


def test_asyn_calls_to_a_busy_server_queue_fifo(host):
    enc, v, log = _asyn(host, 1)
    t = time.monotonic()
    assert enc.run() == 0
    assert time.monotonic() - t < 0.5           # nobody waited for the busy server
    assert list(v[16:19]) == [0, 0, 0]
    assert wait_until(lambda: log[0] == 3, 5)
    assert [log[1 + 5 * i] for i in range(3)] == [100, 2, 3]
    assert [log[2 + 5 * i] for i in range(3)] == [10, 11, 12]


def test_asyn_to_a_server_that_dies_frees_its_regions(host):
    enc, v, log = _asyn(host, 2)
    assert enc.run() == 0
    assert list(v[16:18]) == [0, 0]             # accepted: the sender learns no more
    assert wait_until(lambda: not [e for e in host.ps()["enclaves"]], 5)
    assert log[0] == 0                          # never delivered
    assert wait_until(lambda: not host.ps()["regions"] or all(
        r["kind"] == "shm" for r in host.ps()["regions"]), 5)


def test_asyn_refusals_are_immediate_and_keep_the_region(host):
    enc, v, log = _asyn(host, 3)
    assert enc.run() == 0
    assert v[16] == NoSuchServer.code and v[17] == 1
    assert v[18] == NotOwned.code
    assert v[19] == BadSize.code
    assert v[20] in (Unaligned.code, NotOwned.code)
    assert v[21] == 1 and v[22] == 0
    assert wait_until(lambda: log[0] == 1, 5) and log[1] == 4


# ---------------------------------------------------------------- the demos
def _launch(clean, *args):
    out = subprocess.run([sys.executable, "-m", "tvmrt", "launch", "--socket", clean.path,
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_launch_relay_page(clean):
    assert _launch(clean, "relay_page").splitlines() == [
        "relay_page 1 000056ce", "relay_page 2 00000000",
        "host: PLenclave run is finish ", "host: after exit the thread"]


def test_launch_mem_5(clean):
    lines = _launch(clean, "mem", "5").splitlines()
    assert lines[-1] == "host: after exit the thread"
    assert lines.count("host: PLenclave run is finish ") == 5
    for fixed in ("begin test malloc", "end test malloc", "begin test mmap",
                  "end test mmap:2621440", "begin test sbrk", "end test sbrk"):
        assert lines.count(fixed) == 5
    sbrk = [ln for ln in lines if ln.startswith("ret of sbrk")]
    assert len(sbrk) == 25
    got = [(m.group(1), int(m.group(2), 16))
           for m in (re.fullmatch(r"ret of sbrk\((.*)\):0x([0-9a-f]{16})", s) for s in sbrk)]
    bases = {v - 0x1000 for call, v in got if call == "0"}
    assert len(bases) >= 1
    offsets = {call: {v - b for b in bases for c, v in got if c == call} for call in
               ("0", "-4096", "4*4096", "1*4096", "-10*4096")}
    for call, off in (("0", 0x1000), ("-4096", 0), ("4*4096", 0x7000),
                      ("1*4096", 0x8000), ("-10*4096", 0)):
        assert off in offsets[call]


# ---------------------------------------------------------------- split_mem_region
def test_split_then_loan_one_half_while_writing_the_other(host):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    enc = host.create(eapp("split_caller"), name="splitter", shm=shm)
    assert enc.run() == 0
    got = list(v[16:35])
    assert got[:10] == [0, 0, 1, 31, 40, 10, 0, 0, 41, 31]
    assert got[10:15] == [Unaligned.code, BadSize.code, BadSize.code, BadSize.code,
                          NotOwned.code]
    assert got[15:] == [0, 41, 0, 0]
    assert wait_until(lambda: all(r["kind"] == "shm" for r in host.ps()["regions"]), 5)


def test_split_then_give_one_half_away_by_asyn(host):
    enc, v, log = _asyn(host, 4)
    assert enc.run() == 0
    assert list(v[16:21]) == [0, 0, 1023, 0, 0]
    assert wait_until(lambda: log[0] == 1, 5)
    assert list(log[1:4]) == [5, 77, 3 * 0x1000]     # the server got the right pages


def test_asyn_to_a_full_queue_is_refused_at_once():
    """The queue bound, on the core itself (a real monitor's is 1024 deep)."""
    from core_driver import Driver
    from tvmrt._layout import ARENAS, PAGE
    from tvmrt.errors import QuotaExceeded
    from tvmrt.monitor import core as C
    from tvmrt.monitor.config import Config

    d = Driver(C.Core(Config(key=b"k" * 32, max_queue=1, arenas=dict(ARENAS))))
    h = d.connect()
    d.message(h, {"op": "create", "rid": 1, "name": "s", "type": C.SERVER, "code": b"s"})
    d.message(h, {"op": "create", "rid": 2, "name": "n", "type": C.NORMAL, "code": b"n"})
    n = next(e for e in d.core.slots if e is not None and e.name == "n")
    d.message(h, {"op": "run", "rid": 3, "handle": n.handle})
    codes = []
    for rid in (10, 11, 12):
        d.message(n.peer, {"op": "mmap", "rid": rid + 100, "size": PAGE})
        vaddr = d.last_reply["vaddr"]
        d.message(n.peer, {"op": "asyn", "rid": rid, "name": "s", "arg": rid,
                           "vaddr": vaddr, "size": PAGE})
        rep = d.last_reply
        codes.append(0 if rep["op"] == "r" else rep["c"])
        d.check()
    # the first is served, the second queued, the third refused (its region granted back)
    assert codes == [0, 0, QuotaExceeded.code]
    assert "g" in d.last_reply and d.last_reply["g"][0][1] == vaddr
    assert d.core.by_vaddr[vaddr].owner == n.peer
    d.finish()
