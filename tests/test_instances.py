"""Server instances: N processes behind one name (issue 6)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from conftest import eapp
from tvmrt import SERVER, errors as E

pytestmark = pytest.mark.timeout(60)


def _callers(host, req_args):
    """Run one caller enclave per req_arg at once; returns each one's shm ints."""
    out = []
    encs = []
    for i, a in enumerate(req_args):
        shm = host.shmget(0x1000)
        shm.view.cast("i")[0] = a
        encs.append((host.create(eapp("instance_caller"), name=f"c{i}", shm=shm), shm))
    threads = [threading.Thread(target=enc.run, kwargs={"timeout": 30}) for enc, _ in encs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    for _enc, shm in encs:
        out.append(list(shm.view.cast("i")[:5]))
        shm.remove()
    return out


def test_calls_are_spread_over_idle_instances(host):
    pool = host.create(eapp("instance_server"), name="pool", type=SERVER, instances=3)
    assert pool.instances == 3
    rows = [e for e in host.ps()["enclaves"] if e["name"] == "pool"]
    assert sorted(e["instance"] for e in rows) == [0, 1, 2]
    assert {e["pool"] for e in rows} == {pool.handle}
    assert len({e["pid"] for e in rows}) == 3
    res = _callers(host, [1, 1, 1])                      # three slow calls at once
    assert all(r[1] == 0 and r[3] == 42 and r[4] == 1 for r in res), res
    assert len({r[2] for r in res}) == 3, res             # each on its own instance
    assert {r[2] for r in res} == {e["eid"] for e in rows}


def test_callers_queue_when_every_instance_is_busy(host):
    host.create(eapp("instance_server"), name="pool", type=SERVER, instances=2)
    res = _callers(host, [1, 1, 1, 1, 1])                 # 5 callers, 2 instances
    assert all(r[1] == 0 and r[3] == 42 for r in res), res
    assert len({r[2] for r in res}) == 2


def test_a_dying_instance_fails_only_its_own_call(host):
    pool = host.create(eapp("instance_server"), name="pool", type=SERVER, instances=3)
    res = _callers(host, [2, 1, 1])                      # the first kills its instance
    dead = [r for r in res if r[1] != 0]
    assert len(dead) == 1 and dead[0][1] == E.PeerDied.code, res
    assert dead[0][4] == 1                                # its loan came back
    assert all(r[1] == 0 and r[3] == 42 for r in res if r[1] == 0), res
    alive = [e for e in host.ps()["enclaves"] if e["name"] == "pool" and e["state"] != "done"]
    assert len(alive) == 2
    res = _callers(host, [0, 0])                          # the others keep serving
    assert all(r[1] == 0 for r in res), res
    pool.destroy()                                        # the handle ends every instance
    assert not [e for e in host.ps()["enclaves"] if e["name"] == "pool"
                and e["state"] != "done"]
    res = _callers(host, [0])
    assert res[0][1] in (E.NoSuchServer.code, E.PeerDied.code, E.UnknownHandle.code), res


def test_instances_are_checked(host):
    with pytest.raises(E.InvalidArgument):
        host.create(eapp("instance_server"), name="pool", type=SERVER, instances=0)
    with pytest.raises(E.InvalidArgument):
        host.create(eapp("instance_caller"), name="n", instances=2)   # not a server


def test_ps_shows_instances(host):
    host.create(eapp("instance_server"), name="pool", type=SERVER, instances=2)
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " pool " in ln]
    assert len(lines) == 2 and "inst" in r.stdout
