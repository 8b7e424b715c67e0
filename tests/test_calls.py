"""call_enclave between enclave processes: loans, responses, errors, faults."""
from __future__ import annotations

import threading

import pytest

from conftest import eapp, wait_until
from tvmrt import SERVER
from tvmrt.errors import (
    BadReturn,
    BadSize,
    CallCycle,
    EnclaveFault,
    NoSuchServer,
    NotOwned,
    PeerDied,
    ServerBusy,
    Unaligned,
    UnknownHandle,
)

pytestmark = pytest.mark.timeout(60)


def _probe(host, scenario, servers=("echo",)):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    v[0] = scenario
    for name in servers:
        host.create(eapp("cycler" if name == "cycler" else "echo_server"), name=name,
                    type=SERVER)
    enc = host.create(eapp("call_probe"), name="probe", shm=shm)
    return enc, v


def test_bad_arguments_get_distinct_errors_and_monitor_keeps_serving(host):
    enc, v = _probe(host, 0)
    assert enc.run() == 0
    got = list(v[8:18])
    assert got[:7] == [NotOwned.code, Unaligned.code, BadSize.code, BadSize.code,
                       BadSize.code, UnknownHandle.code, NoSuchServer.code]
    assert len(set(got[:6])) == 4
    assert got[7:] == [0, 10, 41]       # then a good call: resp_val 9+1, loan back with +1


def test_server_faults_return_errors_and_loans(host):
    enc, v = _probe(host, 1)
    assert enc.run() == 0
    rc1, val1, why1, rc2, val2, why2, rc3, val3, why3 = v[8:17]
    assert rc1 == EnclaveFault.code and val1 == 40 and why1 > 0   # raised: loan back untouched
    assert rc2 == 0 and val2 == 41                                   # server still serves
    assert rc3 == PeerDied.code and val3 == 41 and why3 > 0          # server process exited


def test_response_region_moves_to_caller(host):
    enc, v = _probe(host, 2)
    assert enc.run() == 0
    assert list(v[8:12]) == [0, 0x4000, 5 * 0x1000, BadReturn.code]


def test_enclave_touching_loaned_region_faults(host):
    enc, v = _probe(host, 3)
    with pytest.raises(EnclaveFault) as ei:
        enc.run()
    assert "SIGSEGV" in ei.value.reason
    assert v[2] == 1       # the runtime's own check raised NotOwned first
    assert v[3] == 0       # the raw write never completed


def test_cycle_fails_at_once(host):
    enc, v = _probe(host, 4, servers=("echo", "cycler"))
    assert enc.run() == 0
    assert v[8] == 0                              # the call itself worked...
    assert v[9] == CallCycle.code                 # ...and the server's self-call failed


def test_busy_server_queues_and_nonblocking_is_refused(host):
    host.create(eapp("echo_server"), name="echo", type=SERVER)
    shm_a, shm_b = host.shmget(0x1000), host.shmget(0x1000)
    va, vb = shm_a.view.cast("i"), shm_b.view.cast("i")
    va[0], vb[0] = 5, 6
    a = host.create(eapp("call_probe"), name="slow", shm=shm_a)
    b = host.create(eapp("call_probe"), name="eager", shm=shm_b)
    result = {}
    ta = threading.Thread(target=lambda: result.setdefault("a", a.run()))
    ta.start()
    try:
        # the server is inside "slow"'s call (it sleeps 0.5 s there), not merely asked
        assert wait_until(lambda: _state(host, "echo") == "serving", 10)
        assert b.run() == 0
    finally:
        ta.join(10)
    assert not ta.is_alive() and result["a"] == 0
    assert va[8] == 0
    assert list(vb[8:11]) == [ServerBusy.code, 0, 8]


def _state(host, name):
    return next(e["state"] for e in host.ps()["enclaves"] if e["name"] == name)


def test_nested_calls_via_demo_eapps(host):
    shm = host.shmget(0x4000)
    shm.view.cast("i")[0] = 11111
    rel = host.schrodinger_get(0x4000)
    rel.view.cast("i")[0] = 22222
    host.create("server", name="test-server", type=SERVER)
    host.create("server1", name="test-server1", type=SERVER)
    caller = host.create("caller", name="test-caller", shm=shm)
    caller.set_mem_arg(rel)
    assert caller.run() == 0
    assert rel.owned and rel.view.cast("i")[0] == 22222


def test_eapp_mmap_and_unmap(host):
    enc, v = _probe(host, 7)
    assert enc.run() == 0
    assert list(v[8:15]) == [0, BadSize.code, NotOwned.code, BadSize.code, 0, -1,
                             NotOwned.code]
