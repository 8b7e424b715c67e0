"""Chaos: callers loan regions of random sizes to a server while a chaos thread SIGKILLs
the server (and some callers) at random; every call must return correct data or a
distinct error within its deadline, no region may be lost, and nothing may leak (the
``clean`` fixture).  A short run here; ``pytest -m stress`` runs the long one."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from tvmrt import SERVER, errors as E

pytestmark = pytest.mark.timeout(300)


def _pid_of(host, name):
    for e in host.ps()["enclaves"]:
        if e["name"] == name and e["state"] != "done" and e["pid"]:
            return e["pid"]
    return None


def _chaos(host, callers, calls, max_pages, duration, kill_callers):
    rnd = random.Random(6)
    stop = threading.Event()
    lock = threading.Lock()

    def new_server():
        with lock:
            try:
                host.create("chaos_server", name="chaos", type=SERVER)
            except E.NameInUse:
                pass

    new_server()
    shms, encs = [], []
    for i in range(callers):
        shm = host.shmget(0x1000)
        v = shm.view.cast("i")
        v[0], v[1], v[2] = calls, i, max_pages
        shms.append(shm)
        encs.append(host.create("chaos_caller", name=f"caller{i}", shm=shm))
    results: dict[int, object] = {}

    def run(i):
        try:
            results[i] = encs[i].run(timeout=duration + 60)
        except E.TvmError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    kills = {"server": 0, "caller": 0}
    rounds = 0
    t0 = time.monotonic()
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < duration:
        time.sleep(rnd.uniform(0.05, 0.3))
        victim = "chaos"
        rounds += 1
        if kill_callers and rounds % 4 == 0:
            victim = f"caller{rnd.randrange(callers)}"
        pid = _pid_of(host, victim)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills["server" if victim == "chaos" else "caller"] += 1
        if victim == "chaos":
            time.sleep(0.05)
            new_server()
    stop.set()
    for t in threads:
        t.join(duration + 120)
        assert not t.is_alive(), "a caller never finished: something hangs"
    totals = [0] * 6
    for i, shm in enumerate(shms):
        v = shm.view.cast("i")
        for k in range(6):
            totals[k] += v[8 + k]
        r = results[i]
        # a caller ends with 0, or was killed by the chaos thread
        assert r == 0 or isinstance(r, E.EnclaveFault), (i, r)
    ok, bad, gone, late, other, code = totals
    assert bad == 0, f"{bad} calls returned corrupted data or lost their region"
    assert other == 0, f"{other} calls failed with an unexpected code ({code})"
    assert ok > 0 and kills["server"] > 0, (totals, kills)
    for shm in shms:
        shm.remove()
    return totals, kills


def test_chaos_short(host):
    totals, kills = _chaos(host, callers=3, calls=600, max_pages=64, duration=10,
                           kill_callers=True)
    print(f"\nchaos short: ok/bad/gone/late/other = {totals[:5]}, kills {kills}")


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_chaos_long(host):
    totals, kills = _chaos(host, callers=6, calls=3000, max_pages=4096, duration=300,
                           kill_callers=True)
    print(f"\nchaos long: ok/bad/gone/late/other = {totals[:5]}, kills {kills}")


def test_tvmrt_stress_smoke():
    """``tvmrt stress`` runs host processes with server instances under chaos and ends
    with a summary table and PASS (nothing corrupted, nothing left)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tvmrt", "stress", "--hosts", "2",
                        "--callers", "2", "--calls", "60", "--duration", "3",
                        "--max-pages", "16"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "corrupted data or lost region  0" in r.stdout and "PASS" in r.stdout
    assert "enclaves / regions left        0 / 0" in r.stdout
