"""Edges of the channel, the loan transaction and the error tree (one test per finding of
the issue "Edges as solid as the core"), through real monitor, host and enclave processes."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import eapp, wait_until
from tvmrt import SERVER
from tvmrt.errors import (
    BadExitValue,
    BadSize,
    BadState,
    ChannelClosed,
    EnclaveFault,
    InvalidArgument,
    PeerDied,
    Timeout,
)

pytestmark = pytest.mark.timeout(60)


def _shm(host, *ints):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    for i, x in enumerate(ints):
        v[i] = x
    return shm, v


def test_two_threads_of_one_eapp_get_their_own_replies(host):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    shm, v = _shm(host)
    enc = host.create(eapp("two_threads"), name="two-threads", shm=shm)
    assert enc.run() == 0
    assert list(v[8:16]) == [0, 1000 + 10 + 200, 100 + 200, 1,
                             0, 2000 + 10 + 200, 200 + 200, 1]


def test_requests_at_module_level_do_not_eat_start(host):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    enc = host.create(eapp("module_level"), name="module-level")
    assert enc.run() == 42


@pytest.mark.parametrize("mode", [0, 1], ids=["checked-view", "raw-pointer"])
def test_loan_returned_to_a_lender_that_is_not_waiting(host, mode):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    host.create(eapp("lend_on"), name="lend-on", type=SERVER)
    shm, v = _shm(host, mode)
    enc = host.create(eapp("orphan_loan"), name="orphan-loan", shm=shm)
    assert enc.run() == 0                 # a SIGSEGV on the raw read would be a fault
    assert v[8] == PeerDied.code
    assert v[9] == 1
    assert v[10] == 11                    # echo's +1, at the same address


def test_host_sees_a_returned_loan_without_another_request(host):
    """The host's schrodinger region goes to an enclave that lends it on and dies: it
    comes back to the host while the host makes no request at all."""
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    host.create(eapp("lend_on"), name="lend-on", type=SERVER)
    rel = host.schrodinger_get(0x1000)
    rel.view.cast("i")[0] = 20
    enc = host.create(eapp("forwarder"), name="forwarder")
    enc.set_mem_arg(rel)
    with pytest.raises(EnclaveFault):
        enc.run()                          # the forwarder dies once lend-on has died
    # nothing asks: the channel's watcher applies the grant when echo returns
    assert wait_until(lambda: rel.address in host.table.owned, 10)
    assert ctypes.c_int.from_address(rel.address).value == 21
    assert rel.owned and rel.view.cast("i")[0] == 21


def test_last_words_of_a_dying_enclave_are_read(host):
    for _ in range(5):
        enc = host.create(eapp("last_words"), name="last-words")
        with pytest.raises(EnclaveFault) as ei:
            enc.run()
        assert "last words of a dying enclave" in ei.value.reason


def test_out_of_range_fields_give_codes_and_lose_nothing(host):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    shm, v = _shm(host)
    enc = host.create(eapp("overflow"), name="overflow", shm=shm)
    assert enc.run() == 0
    assert list(v[8:18]) == [InvalidArgument.code, 1, 0, BadSize.code, InvalidArgument.code,
                             1, InvalidArgument.code, InvalidArgument.code, 0, 6]
    with pytest.raises(BadSize):
        host.shmget(1 << 64)
    with pytest.raises(BadSize):
        host.schrodinger_get(1 << 64)
    with pytest.raises(InvalidArgument):
        host.create(eapp("echo_server"), name="x").attest(1 << 64)


def test_stale_views_raise_instead_of_crashing(host):
    shm, _ = _shm(host)
    rel = host.schrodinger_get(0x1000)
    stale = rel.view.cast("i")
    stale[0] = 21
    enc = host.create(eapp("shm_rw"), name="stale", shm=shm)
    enc.set_mem_arg(rel)
    enc.run()
    assert stale[1] == 42                  # back at the same address: usable again
    assert rel.view.cast("i")[1] == 42
    shm_view = shm.view.cast("i")
    rel_view = rel.view
    shm.remove()
    rel.remove()
    with pytest.raises(ValueError):
        shm_view[0] = 1
    with pytest.raises(ValueError):
        bytes(rel_view)


def test_stale_view_used_during_a_run_does_not_crash(host):
    shm, flags = _shm(host)
    rel = host.schrodinger_get(0x1000)
    stale = rel.view.cast("i")
    enc = host.create(eapp("waiter"), name="waiter", shm=shm)
    enc.set_mem_arg(rel)
    t = threading.Thread(target=enc.run)
    t.start()
    try:
        assert wait_until(lambda: flags[1] == 1, 10)
        with pytest.raises(ValueError):
            stale[0] = 5                   # would be SIGSEGV: the enclave holds the page
    finally:
        flags[0] = 1
        t.join(10)
    assert rel.view.cast("i")[0] == 4242


def test_detached_region_stays_detached_after_a_run(host):
    shm, _ = _shm(host)
    rel = host.schrodinger_get(0x1000)
    rel.view.cast("i")[0] = 21
    rel.detach()
    enc = host.create(eapp("shm_rw"), name="detached", shm=shm)
    enc.set_mem_arg(rel)
    enc.run()
    assert not rel.attached and not rel.owned
    with pytest.raises(BadState):
        rel.detach()                       # not attached: says so
    rel.attach()
    assert rel.view.cast("i")[1] == 42
    with pytest.raises(BadState):
        rel.attach()                       # attached twice
    rel.remove()


def test_detach_while_loaned_then_reattach(host):
    shm, flags = _shm(host)
    rel = host.schrodinger_get(0x1000)
    enc = host.create(eapp("waiter"), name="waiter", shm=shm)
    enc.set_mem_arg(rel)
    t = threading.Thread(target=enc.run)
    t.start()
    try:
        assert wait_until(lambda: flags[1] == 1, 10)
        rel.detach()                       # allowed while the enclave holds it
    finally:
        flags[0] = 1
        t.join(10)
    assert not rel.attached
    rel.attach()
    assert rel.owned and rel.view.cast("i")[0] == 4242
    rel.remove()


def test_penglai_detach_run_at_ctl_agree(host):
    from tvmrt import penglai as pl
    assert pl.open_device(host.path) == 0
    try:
        sid = pl.PLenclave_shmget(0x1000)
        ctypes.c_int.from_address(pl.PLenclave_shmat(sid, 0)).value = 3
        rid = pl.PLenclave_schrodinger_get(0x1000)
        addr = pl.PLenclave_schrodinger_at(rid, 0)
        ctypes.c_int.from_address(addr).value = 21
        assert pl.PLenclave_schrodinger_dt(rid, addr) == 0
        enc = pl.PLenclave()
        assert pl.PLenclave_init(enc) == 0
        elf = pl.elf_args()
        pl.elf_args_init(elf, eapp("shm_rw"))
        args = pl.enclave_args()
        pl.enclave_args_init(args)
        args.name = "pl-rel"
        args.shmid, args.shm_size = sid, 0x1000
        assert pl.PLenclave_create(enc, elf, args) == 0
        pl.PLenclave_set_mem_arg(enc, rid, 0, 0x1000)
        assert pl.PLenclave_run(enc) == 0
        assert pl.PLenclave_schrodinger_at(rid, 0) == addr      # not "already attached"
        assert ctypes.c_int.from_address(addr).value == 21
        assert ctypes.c_int.from_address(addr + 4).value == 42
        assert pl.PLenclave_schrodinger_dt(rid, addr) == 0
        assert pl.PLenclave_schrodinger_ctl(rid) == 0
        assert pl.PLenclave_shmdt(sid, 0) == 0
        assert pl.PLenclave_shmctl(sid) == 0
    finally:
        pl.close_device()


def test_eapp_that_does_not_compile_is_refused_at_create(host):
    with pytest.raises(EnclaveFault) as ei:
        host.create(eapp("syntax_error"), name="syntax")
    assert "SyntaxError" in ei.value.reason


@pytest.mark.parametrize("k, expect", [(0, "'hello'"), (1, "range")])
def test_bad_exit_values_are_errors(host, k, expect):
    shm, _ = _shm(host, k)
    enc = host.create(eapp("bad_exit"), name="bad-exit", shm=shm)
    with pytest.raises(BadExitValue) as ei:
        enc.run()
    assert expect in ei.value.reason
    with pytest.raises(BadExitValue):
        enc.run()                          # the recorded fault is what later calls report


@pytest.mark.parametrize("k, value", [(2, (1 << 64) - 1), (3, (1 << 64) - 1)])
def test_exit_values_in_range(host, k, value):
    shm, _ = _shm(host, k)
    assert host.create(eapp("bad_exit"), name="exit", shm=shm).run() == value


def test_close_from_another_thread_wakes_run(clean):
    from tvmrt.host import Host
    h = Host.connect(clean.path, embedded=False)
    try:
        shm, flags = _shm(h)
        enc = h.create(eapp("spinner"), name="spinner", shm=shm)
        errors = []

        def run():
            try:
                enc.run()
            except Exception as exc:       # noqa: BLE001 - the type is the assertion
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        assert wait_until(lambda: flags[1] == 1, 10)
        h.close()
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ChannelClosed), errors
    finally:
        h.close()


def test_run_timeout(host):
    shm, flags = _shm(host)
    enc = host.create(eapp("spinner"), name="spinner", shm=shm)
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        enc.run(timeout=0.3)
    assert time.monotonic() - t0 < 5
    enc.destroy()


def test_call_timeout_covers_a_running_call(host):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    shm, v = _shm(host)
    enc = host.create(eapp("timeout_caller"), name="timeout-caller", shm=shm)
    assert enc.run() == 0
    assert v[8] == Timeout.code
    assert v[9] == 1 and v[10] == 2        # the loan came back, with the server's +1
    assert v[11] == 0 and v[12] == 9       # and the server serves the next call


def test_sigterm_right_after_start_is_not_lost(tmp_path):
    for i in range(10):
        path = str(tmp_path / f"m{i}.sock")
        p = subprocess.Popen([sys.executable, "-m", "tvmrt", "monitor", "--socket", path,
                              "--quiet"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # signal as early as the process can have installed anything
        wait_until(lambda path=path, p=p: os.path.exists(path) or p.poll() is not None,
                   10, 0.0005)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
