"""``tvmrt stress``: several host processes, each with a server of several instances and
caller enclaves loaning regions of random sizes (contents checked at both ends of every
call), while each host's chaos thread SIGKILLs its server instances and callers at random.

The parent starts (or uses) a monitor and the host processes (``python -m tvmrt._stress
host ...``), prints one progress line a second and a summary table at the end, then checks
that the monitor is back where it started: no enclave, no region, no ``/dev/shm`` segment
left, its fds back to their count.  Exit status 0 only if no call returned corrupted data or
an unexpected error, every caller finished, and nothing leaked.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

#: outcome counters of a caller (shm ints 8..12), in this order
OUTCOMES = ("ok", "bad", "gone", "late", "other")


def _segments() -> int:
    try:
        return sum(1 for n in os.listdir("/dev/shm") if n.startswith("tvmrt."))
    except OSError:
        return 0


def _writable_segments(pid: int) -> set[int]:
    """Numbers of the tvmrt segments process ``pid`` maps writable now (a segment's name
    is ``/tvmrt.<monitor pid>.<segment number, hex>.<random>``)."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[1][1] == "w" and "/tvmrt." in parts[5]:
                    name = parts[5].rsplit("/", 1)[1].split()[0]
                    fields = name.split(".")
                    if len(fields) == 4:
                        out.add(int(fields[2], 16))
    except (OSError, ValueError):
        pass                                # it died meanwhile: it holds nothing
    return out


def _state(pid: int) -> str:
    """The process's state letter (``T`` stopped, ``Z`` zombie, ...), ``?`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def ownership_sample(host, names) -> list[str]:
    """Stop every live enclave whose name is in ``names`` (SIGSTOP), read which segments
    each maps writable (``/proc/PID/maps``), ask the monitor who owns what, and let them
    go on.  With the holders stopped nothing about their regions can be in flight, so: no
    relay region may have two writers, and a region one process can write must be that
    process's in the monitor's table.  (A freed region may still be mapped by the process
    that freed it until it reads the reply carrying its drop: not a violation.)  Segments
    are told apart by the number in their name, not by address: addresses are reused.
    Returns the violations found."""
    rows = [e for e in host.ps()["enclaves"]
            if e["state"] != "done" and e["pid"] and e["name"] in names]
    stopped = []
    try:
        for e in rows:
            try:
                os.kill(e["pid"], signal.SIGSTOP)
                stopped.append(e)
            except ProcessLookupError:
                pass
        # SIGSTOP is asynchronous: wait until each one really is stopped.  One that
        # never stops is dying (killed by the chaos thread): it keeps its last mappings
        # until it is torn down while the monitor has freed its regions already, so it is
        # not looked at.
        frozen = []
        for e in stopped:
            until = time.monotonic() + 0.2
            while (st := _state(e["pid"])) not in ("T", "t", "Z", "X", "?") \
                    and time.monotonic() < until:
                time.sleep(0.0005)
            if st in ("T", "t"):
                frozen.append(e)
        writers: dict[int, list[dict]] = {}
        for e in frozen:
            for seg in _writable_segments(e["pid"]):
                writers.setdefault(seg, []).append(e)
        table = host.ps()
    finally:
        for e in stopped:
            try:
                os.kill(e["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
    by_seg = {r["seg"]: r for r in table["regions"]}
    who = {e["peer"]: e["name"] for e in table["enclaves"]}
    bad = []
    for seg, es in writers.items():
        r = by_seg.get(seg)
        if r is None:
            continue            # freed: the process that asked has not read its drop yet
        if r["kind"] != "relay":
            continue            # shared memory: several writers by design
        if len(es) > 1:
            bad.append(f"region {r['vaddr']:#x} writable in "
                       f"{[e['name'] for e in es]} at once")
        elif r["owner"] != es[0]["peer"]:
            bad.append(f"region {r['vaddr']:#x} writable in {es[0]['name']} but owned by "
                       f"{who.get(r['owner'], r['owner'])} in the monitor's table, "
                       f"lenders {[who.get(x, x) for x in r['lenders']]}")
    return bad


# ---------------------------------------------------------------------- one host process
def host_main(argv: list[str]) -> int:
    """A host process: ``path tag callers calls max_pages instances duration chaos``.
    Prints JSON lines: progress every 0.5 s, then the totals."""
    from tvmrt.host import Host

    path, tag = argv[0], int(argv[1])
    callers, calls, max_pages, instances = (int(x) for x in argv[2:6])
    with Host.connect(path, embedded=False) as host:
        res = run_host(host, tag, callers, calls, max_pages, instances, float(argv[6]),
                       argv[7] == "1",
                       lambda done: print(json.dumps({"tag": tag, "done": done}),
                                          flush=True))
    print(json.dumps({"tag": tag, **res}), flush=True)
    return 0


def run_host(host, tag: int, callers: int, calls: int, max_pages: int, instances: int,
             duration: float, chaos: bool, progress=None,
             pace: tuple[float, float] = (0.1, 0.6)) -> dict:
    """One host's share of the stress, on ``host``: server ``chaos-<tag>`` ("chaos" for
    tag 0) with ``instances`` instances and ``callers`` caller enclaves of ``calls``
    calls each; for ``duration`` seconds (if ``chaos``) random instances and now and then
    a caller are SIGKILLed, and a server whose every instance died is started again.

    Returns ``{"final": {outcome: count}, "kills": {...}, "ends": {caller: how it
    ended}, "other_code": the last unexpected error code}``; ``progress(done)`` is called
    every 0.5 s; a kill comes every ``pace`` (low, high) seconds.  Between kills an
    :func:`ownership_sample` compares who can write each region with the monitor's table
    (``samples``, ``violations``).
    """
    from tvmrt import SERVER
    from tvmrt.errors import NameInUse, TvmError

    rnd = random.Random(tag)
    server = "chaos" if tag == 0 else f"chaos-{tag}"
    lock = threading.Lock()

    def new_server():
        with lock:
            try:
                host.create("chaos_server", name=server, type=SERVER, instances=instances)
            except NameInUse:
                pass

    new_server()
    shms, encs = [], []
    for i in range(callers):
        shm = host.shmget(0x1000)
        v = shm.view.cast("i")
        v[0], v[1], v[2], v[3] = calls, tag * 1000 + i, max_pages, tag
        shms.append(shm)
        encs.append(host.create("chaos_caller", name=f"caller-{tag}-{i}", shm=shm))
    ends: dict[int, str] = {}

    def run(i):
        try:
            ends[i] = str(encs[i].run(timeout=duration + 120))
        except TvmError as exc:
            ends[i] = type(exc).__name__

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    kills = {"instance": 0, "caller": 0}
    samples, violations = 0, []
    names = {server} | {f"caller-{tag}-{i}" for i in range(callers)}
    t0 = time.monotonic()
    last = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(rnd.uniform(*pace) if chaos else 0.1)
        violations += ownership_sample(host, names)
        samples += 1
        if chaos and time.monotonic() - t0 < duration:
            rows = [e for e in host.ps()["enclaves"] if e["state"] != "done"
                    and e["pid"] and (e["name"] == server
                                      or e["name"].startswith(f"caller-{tag}-"))]
            victim = rnd.choice(rows) if rows else None
            # callers seldom, and a third of them at most (one at least): each one
            # killed ends its part of the run
            if victim is not None and (victim["name"] == server or (
                    rnd.random() < 0.1 and kills["caller"] < max(1, callers // 3))):
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills["instance" if victim["name"] == server else "caller"] += 1
                except ProcessLookupError:
                    pass
        # a server whose every instance was killed is started again
        if not [e for e in host.ps()["enclaves"]
                if e["name"] == server and e["state"] != "done"]:
            new_server()
        if progress is not None and time.monotonic() - last >= 0.5:
            last = time.monotonic()
            progress(sum(s.view.cast("i")[5] for s in shms))
    for t in threads:
        t.join(5)
    totals = dict.fromkeys(OUTCOMES, 0)
    code = 0
    for shm in shms:
        v = shm.view.cast("i")
        for k, name in enumerate(OUTCOMES):
            totals[name] += v[8 + k]
        code = code or v[13]
        shm.remove()
    return {"final": totals, "kills": kills, "ends": ends, "other_code": code,
            "samples": samples, "violations": violations[:20]}


# ---------------------------------------------------------------------- the parent
def main(ns) -> int:
    """``tvmrt stress``: see the module docstring."""
    import psutil

    from tvmrt._embedded import EmbeddedMonitor
    from tvmrt.host import Host

    embedded = None
    path = ns.socket
    if path is None:
        embedded = EmbeddedMonitor().start()
        path = embedded.path
    try:
        with Host.connect(path, embedded=False) as probe:
            mon_pid = embedded.pid if embedded is not None else None
            base = probe.ps()
        mon = psutil.Process(mon_pid) if mon_pid else None
        fds0 = mon.num_fds() if mon else None
        rss0 = mon.memory_info().rss if mon else None
        segs0 = _segments()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "tvmrt._stress", "host", path, str(i + 1),
             str(ns.callers), str(ns.calls), str(ns.max_pages), str(ns.instances),
             str(ns.duration), "0" if ns.no_chaos else "1"],
            stdout=subprocess.PIPE, text=True) for i in range(ns.hosts)]
        progress = dict.fromkeys(range(1, ns.hosts + 1), 0)
        finals: dict[int, dict] = {}

        def read(p):
            for line in p.stdout:
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if "final" in m:
                    finals[m["tag"]] = m
                else:
                    progress[m["tag"]] = m["done"]

        readers = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
        for t in readers:
            t.start()
        total = ns.hosts * ns.callers * ns.calls
        t0 = time.monotonic()
        killed_host = None
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            done = sum(progress.values())
            if (not ns.no_chaos and killed_host is None and ns.hosts > 1
                    and done >= total * 0.3 and procs[-1].poll() is None):
                # one host process dies mid-run: its enclaves and regions must go with it
                killed_host = procs[-1]
                killed_host.kill()
            rate = done / max(time.monotonic() - t0, 1e-9)
            print(f"\r{done:>8}/{total} calls  {rate:8.0f} calls/s  "
                  f"{time.monotonic() - t0:6.1f} s", end="", flush=True)
        for t in readers:
            t.join(5)
        elapsed = time.monotonic() - t0
        print()
        with Host.connect(path, embedded=False) as probe:
            # what the hosts made goes with them; give the monitor a moment to reap
            deadline = time.monotonic() + 10
            while True:
                after = probe.ps()
                left_e = [e for e in after["enclaves"] if e["state"] != "done"]
                left_r = after["regions"]
                if (not left_e and len(left_r) == len(base["regions"])) or \
                        time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        fds1 = None
        if mon is not None:
            # the probe's own connection closes asynchronously: give it a moment
            until = time.monotonic() + 5
            while (fds1 := mon.num_fds()) > fds0 and time.monotonic() < until:
                time.sleep(0.05)
        rss1 = mon.memory_info().rss if mon else None
        segs1 = _segments()
        survivors: list[int] = []
        if mon is not None and not ns.no_chaos:
            # last: SIGKILL the monitor itself; its zygote and every enclave must follow
            with Host.connect(path, embedded=False) as h:
                h.create("chaos_server", name="last", type=1, instances=2)
                pids = [e["pid"] for e in h.ps()["enclaves"] if e["pid"]]
                family = [c.pid for c in mon.children(recursive=True)]
                mon.kill()
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    survivors = [p for p in set(pids + family) if psutil.pid_exists(p)
                                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
                    if not survivors:
                        break
                    time.sleep(0.05)
    finally:
        if embedded is not None:
            embedded.stop()
    segs2 = _segments()
    sums = dict.fromkeys(OUTCOMES, 0)
    kills = {"instance": 0, "caller": 0}
    for m in finals.values():
        for k in OUTCOMES:
            sums[k] += m["final"][k]
        for k in kills:
            kills[k] += m["kills"][k]
    samples = sum(m["samples"] for m in finals.values())
    violations = [v for m in finals.values() for v in m["violations"]]
    for v in violations[:10]:
        print(f"ownership violation: {v}")
    rows = [("host processes", f"{ns.hosts} ({len(finals)} finished"
                               f"{', 1 SIGKILLed' if killed_host is not None else ''})"),
            ("callers x calls", f"{ns.hosts * ns.callers} x {ns.calls}"),
            ("server instances per host", str(ns.instances)),
            ("duration", f"{elapsed:.1f} s"),
            ("calls correct", str(sums["ok"])),
            ("calls failed: server gone", str(sums["gone"])),
            ("calls failed: deadline", str(sums["late"])),
            ("calls failed: other", str(sums["other"])),
            ("corrupted data or lost region", str(sums["bad"])),
            ("instances / callers killed", f"{kills['instance']} / {kills['caller']}"),
            ("ownership samples (/proc/PID/maps)",
             f"{samples}, {len(violations)} with a second writer or a wrong owner"),
            ("enclaves / regions left", f"{len(left_e)} / {len(left_r) - len(base['regions'])}"),
            ("/dev/shm segments", f"{segs0} -> {segs1}")]
    fds_back = fds0 is None or (fds1 is not None and fds1 <= fds0)
    if mon is not None and rss0 is not None and rss1 is not None:
        rows += [("monitor fds", f"{fds0} -> {fds1}"),
                 ("monitor RSS", f"{rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB")]
        if not ns.no_chaos:
            rows += [("after SIGKILL of the monitor", f"{len(survivors)} processes left, "
                      f"{segs2} segments in /dev/shm")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    expected = ns.hosts - (1 if killed_host is not None else 0)
    ok = (sums["bad"] == 0 and sums["other"] == 0 and len(finals) >= expected
          and not left_e and len(left_r) == len(base["regions"]) and segs1 <= segs0
          and fds_back and not survivors and segs2 <= segs0 and not violations)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "host":
        sys.exit(host_main(sys.argv[2:]))
    sys.exit(2)
