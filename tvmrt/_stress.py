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


def _writable_segments(pid: int) -> set[int]:
    """Numbers of the tvmrt segments process ``pid`` maps writable now (a segment's name
    is ``tvmrt.<monitor pid>.<segment number, hex>.<random>``: a memfd, shown as
    ``/memfd:<name> (deleted)``), in the arenas where regions live.  A big region the
    process has given up is parked (``tvmrt._memory.park``): still mapped, in the park
    arena, while its own address is ``PROT_NONE``; the ownership checked here is who can
    write a region at its address, so the park arena is left out."""
    from ._layout import PARK_ARENA
    park_lo, park_hi = PARK_ARENA[0], PARK_ARENA[0] + PARK_ARENA[1]
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[1][1] == "w" and "/memfd:tvmrt." in parts[5] \
                        and not park_lo <= int(parts[0].split("-", 1)[0], 16) < park_hi:
                    name = parts[5].rsplit("/", 1)[1].split()[0]
                    fields = name.split(".")
                    if len(fields) == 4:
                        out.add(int(fields[2], 16))
    except PermissionError:
        raise       # not root: an enclave is non-dumpable, its /proc is root's
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


def ownership_sample(host, names) -> list[str] | None:
    """Stop every live enclave whose name is in ``names`` (SIGSTOP), read which segments
    each maps writable (``/proc/PID/maps``), ask the monitor who owns what, and let them
    go on.  With the holders stopped nothing about their regions can be in flight, so: no
    relay region may have two writers, and a region one process can write must be that
    process's in the monitor's table.  (A freed region may still be mapped by the process
    that freed it until it reads the reply carrying its drop: not a violation.)  Segments
    are told apart by the number in their name, not by address: addresses are reused.
    Returns the violations found, or None if this user cannot read the enclaves'
    ``/proc/PID/maps`` (they are non-dumpable: only root can)."""
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
        try:
            for e in frozen:
                for seg in _writable_segments(e["pid"]):
                    writers.setdefault(seg, []).append(e)
        except PermissionError:
            return None
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
    """One host's share of the stress, on ``host``: a chain of three servers (level 1
    ``chaos-<tag>`` ("chaos" for tag 0) with ``instances`` instances, levels 2 and 3 that
    name with ``.2`` and ``.3``, one instance each: ``eapps/chaos_server.py``) and
    ``callers`` caller enclaves of ``calls`` calls each (``eapps/chaos_caller.py``:
    regions of 1 to ``max_pages`` pages, log-uniform, checksummed at every hop; every
    third call goes three deep).  For ``duration`` seconds (if ``chaos``) a random
    server instance of any level, and now and then a caller, is SIGKILLed; a level whose
    every instance died is started again.

    Returns ``{"final": {outcome: count}, "kills": {...}, "ends": {caller: how it
    ended}, "other_code": the last unexpected error code, "deep": calls that went three
    deep and came back correct, "mib": MiB loaned}``; ``progress(done)`` is called every
    0.5 s; a kill comes every ``pace`` (low, high) seconds.  Between kills an
    :func:`ownership_sample` compares who can write each region with the monitor's table
    (``samples``, ``violations``; ``unreadable``: samples this user could not take).
    """
    from tvmrt import SERVER
    from tvmrt.errors import NameInUse, TvmError

    rnd = random.Random(tag)
    base = "chaos" if tag == 0 else f"chaos-{tag}"
    levels = {1: base, 2: f"{base}.2", 3: f"{base}.3"}
    lock = threading.Lock()
    configs = {}
    for level in levels:
        shm = host.shmget(0x1000)
        v = shm.view.cast("i")
        v[0], v[1] = level, tag
        configs[level] = shm

    def new_server(level):
        with lock:
            try:
                host.create("chaos_server", name=levels[level], type=SERVER,
                            instances=instances if level == 1 else 1, shm=configs[level])
            except NameInUse:
                pass

    for level in levels:
        new_server(level)
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
            ends[i] = str(encs[i].run(timeout=duration + 600))
        except TvmError as exc:
            ends[i] = type(exc).__name__

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    kills = {"instance": 0, "caller": 0}
    samples, unreadable, violations = 0, 0, []
    servers = set(levels.values())
    names = servers | {f"caller-{tag}-{i}" for i in range(callers)}
    t0 = time.monotonic()
    last = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(rnd.uniform(*pace) if chaos else 0.1)
        found = ownership_sample(host, names)
        if found is None:
            unreadable += 1
        else:
            violations += found
            samples += 1
        rows = [e for e in host.ps()["enclaves"] if e["state"] != "done" and e["pid"]
                and e["name"] in names]
        if chaos and time.monotonic() - t0 < duration and rows:
            victim = rnd.choice(rows)
            # callers seldom, and a third of them at most (one at least): each one
            # killed ends its part of the run
            if victim["name"] in servers or (
                    rnd.random() < 0.1 and kills["caller"] < max(1, callers // 3)):
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills["instance" if victim["name"] in servers else "caller"] += 1
                except ProcessLookupError:
                    pass
        # a level whose every instance was killed is started again
        live = {e["name"] for e in host.ps()["enclaves"] if e["state"] != "done"}
        for level, name in levels.items():
            if name not in live:
                new_server(level)
        if progress is not None and time.monotonic() - last >= 0.5:
            last = time.monotonic()
            progress(sum(s.view.cast("i")[5] for s in shms))
    for t in threads:
        t.join(5)
    totals = dict.fromkeys(OUTCOMES, 0)
    code = deep = kib = 0
    for shm in shms:
        v = shm.view.cast("i")
        for k, name in enumerate(OUTCOMES):
            totals[name] += v[8 + k]
        code = code or v[13]
        deep += v[6]
        kib += v[7]
        shm.remove()
    for shm in configs.values():
        shm.remove()
    return {"final": totals, "kills": kills, "ends": ends, "other_code": code,
            "samples": samples, "unreadable": unreadable, "violations": violations[:20],
            "deep": deep,
            "mib": kib // 1024}


# ---------------------------------------------------------------------- the parent
#: allowed growth of the monitor's RSS from the end of the warm-up (a tenth of the calls)
#: to the end of the run: beyond it the run fails (a leak per call would show here)
RSS_SLACK = 32 << 20


def _segments(mon_pid: int | None = None) -> int:
    """This monitor's segments in ``/dev/shm`` (every tvmrt segment if ``mon_pid`` is
    None)."""
    prefix = "tvmrt." if mon_pid is None else f"tvmrt.{mon_pid}."
    try:
        return sum(1 for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except OSError:
        return 0


def main(ns) -> int:
    """``tvmrt stress``: see the module docstring."""
    import psutil

    from tvmrt._embedded import EmbeddedMonitor
    from tvmrt._scale import ps_with_pool_full
    from tvmrt.host import Host

    embedded = None
    path = ns.socket
    if path is None:
        embedded = EmbeddedMonitor().start()
        path = embedded.path
    survivors: list[int] = []
    rss_series: list[tuple[int, int]] = []       # (calls done, monitor RSS)
    killed_monitor = False
    try:
        # one probe connection for the whole run: the monitor's figures come from its
        # own ps (works for a monitor of any owner, dumpable or not), and its fd count
        # includes this connection at the start and at the end alike
        probe = Host.connect(path, embedded=False)
        try:
            base = ps_with_pool_full(probe, 10.0)
            m0 = base["monitor"]
            mon_pid = m0["pid"]
            segs0 = _segments(mon_pid)
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

            readers = [threading.Thread(target=read, args=(p,), daemon=True)
                       for p in procs]
            for t in readers:
                t.start()
            total = ns.hosts * ns.callers * ns.calls
            t0 = time.monotonic()
            killed_host = None
            answers = 0
            while any(p.poll() is None for p in procs):
                time.sleep(1.0)
                done = sum(progress.values())
                if (not ns.no_chaos and killed_host is None and ns.hosts > 1
                        and done >= total * 0.3 and procs[-1].poll() is None):
                    # one host process dies mid-run: its enclaves and regions go with it
                    killed_host = procs[-1]
                    killed_host.kill()
                # the monitor still answers, and its RSS over the run
                rss_series.append((done, probe.ps()["monitor"]["rss"]))
                answers += 1
                rate = done / max(time.monotonic() - t0, 1e-9)
                print(f"\r{done:>8}/{total} calls  {rate:8.0f} calls/s  "
                      f"{time.monotonic() - t0:6.1f} s  monitor RSS "
                      f"{rss_series[-1][1] / 2**20:6.1f} MiB", end="", flush=True)
            for t in readers:
                t.join(5)
            elapsed = time.monotonic() - t0
            print()
            # what the hosts made goes with them; give the monitor a moment to reap
            deadline = time.monotonic() + 10
            while True:
                after = probe.ps()
                left_e = [e for e in after["enclaves"] if e["state"] != "done"]
                left_r = after["regions"]
                m1 = after["monitor"]
                if (not left_e and len(left_r) == len(base["regions"])
                        and m1["fds"] <= m0["fds"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            segs1 = _segments(mon_pid)
            if embedded is not None and not ns.no_chaos:
                # last: SIGKILL the monitor itself; its zygote and every enclave follow
                probe.create("chaos_server", name="last", type=1, instances=2)
                mon = psutil.Process(mon_pid)
                pids = [e["pid"] for e in probe.ps()["enclaves"] if e["pid"]]
                family = [c.pid for c in mon.children(recursive=True)]
                mon.kill()
                killed_monitor = True
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    survivors = [p for p in set(pids + family) if psutil.pid_exists(p)
                                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
                    if not survivors:
                        break
                    time.sleep(0.05)
        finally:
            probe.close()
    finally:
        if embedded is not None:
            embedded.stop()
    segs2 = _segments(mon_pid)
    sums = dict.fromkeys(OUTCOMES, 0)
    kills = {"instance": 0, "caller": 0}
    for m in finals.values():
        for k in OUTCOMES:
            sums[k] += m["final"][k]
        for k in kills:
            kills[k] += m["kills"][k]
    deep = sum(m["deep"] for m in finals.values())
    mib = sum(m["mib"] for m in finals.values())
    samples = sum(m["samples"] for m in finals.values())
    unreadable = sum(m.get("unreadable", 0) for m in finals.values())
    violations = [v for m in finals.values() for v in m["violations"]]
    for v in violations[:10]:
        print(f"ownership violation: {v}")
    # RSS: at the start, once a tenth of the calls is done (allocators warmed up), the
    # peak, and at the end (after the hosts left)
    warm = next((r for d, r in rss_series if d >= total / 10), m0["rss"])
    peak = max([r for _, r in rss_series] + [m0["rss"], m1["rss"]])
    growth = m1["rss"] - warm
    calls_done = sum(sums.values())
    rows = [("host processes", f"{ns.hosts} ({len(finals)} finished"
                               f"{', 1 SIGKILLed' if killed_host is not None else ''})"),
            ("callers x calls", f"{ns.hosts * ns.callers} x {ns.calls}"),
            ("servers per host", f"3 levels deep, {ns.instances} instances at level 1"),
            ("regions", f"1 to {ns.max_pages} pages, {mib} MiB loaned in all"),
            ("duration", f"{elapsed:.1f} s ({calls_done / max(elapsed, 1e-9):.0f} calls/s)"),
            ("calls correct", f"{sums['ok']} ({deep} of them three servers deep)"),
            ("calls failed: server gone", str(sums["gone"])),
            ("calls failed: deadline", str(sums["late"])),
            ("calls failed: other", str(sums["other"])),
            ("corrupted data or lost region", str(sums["bad"])),
            ("instances / callers killed", f"{kills['instance']} / {kills['caller']}"),
            ("ownership samples (/proc/PID/maps)",
             f"{samples}, {len(violations)} with a second writer or a wrong owner"
             + (f"; {unreadable} not taken (enclaves are non-dumpable: only root can "
                f"read their maps)" if unreadable else "")),
            ("monitor answered ps", f"{answers} times during the run"),
            ("enclaves / regions left", f"{len(left_e)} / {len(left_r) - len(base['regions'])}"),
            ("/dev/shm segments", f"{segs0} -> {segs1}"),
            ("monitor fds", f"{m0['fds']} -> {m1['fds']}"),
            ("monitor RSS", f"{m0['rss'] / 2**20:.1f} start, {warm / 2**20:.1f} after a "
                            f"tenth of the calls, {peak / 2**20:.1f} peak, "
                            f"{m1['rss'] / 2**20:.1f} MiB end")]
    if killed_monitor:
        rows += [("after SIGKILL of the monitor", f"{len(survivors)} processes left, "
                  f"{segs2} segments in /dev/shm")]
    elif embedded is None and not ns.no_chaos:
        rows += [("SIGKILL of the monitor", "not done (it is not this run's monitor)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    expected = ns.hosts - (1 if killed_host is not None else 0)
    ok = (sums["bad"] == 0 and sums["other"] == 0 and len(finals) >= expected
          and not left_e and len(left_r) == len(base["regions"]) and segs1 <= segs0
          and m1["fds"] <= m0["fds"] and not survivors and segs2 <= segs0
          and not violations and growth <= RSS_SLACK)
    if growth > RSS_SLACK:
        print(f"monitor RSS grew by {growth / 2**20:.1f} MiB after the warm-up "
              f"(allowed: {RSS_SLACK >> 20} MiB)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "host":
        sys.exit(host_main(sys.argv[2:]))
    sys.exit(2)
