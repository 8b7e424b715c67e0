"""The ``tvmrt`` command: monitor, launch, ps, bench."""
from __future__ import annotations

import argparse
import json
import sys


def _monitor(ns) -> int:
    from tvmrt.errors import TvmError
    from tvmrt.monitor.daemon import Daemon
    try:
        return Daemon(ns.socket, verbose=ns.verbose).run(ready_fd=ns.ready_fd,
                                                           announce=not ns.quiet)
    except TvmError as exc:
        print(f"tvmrt monitor: {exc.reason}", file=sys.stderr)
        return 1


def _launch(ns) -> int:
    from tvmrt import _demo as demo, penglai
    from tvmrt._embedded import EmbeddedMonitor
    from tvmrt._paths import default_socket_path
    from tvmrt.errors import MonitorGone
    from tvmrt.host import _dial

    names = ns.eapps
    embedded = None
    path = ns.socket
    if path is None:
        path = default_socket_path()
        try:
            _dial(path).close()
        except MonitorGone:
            embedded = EmbeddedMonitor(verbose=ns.verbose).start()
            path = embedded.path
    try:
        if penglai.open_device(path) != 0:
            return 1
        if len(names) == 1:
            rc = demo.run_one(names[0])
        elif len(names) in (2, 3):
            rc = demo.test_caller(*names)
        else:
            print("usage: tvmrt launch CALLER [SERVER [SERVER1]]", file=sys.stderr)
            rc = 2
    finally:
        penglai.close_device()
        if embedded is not None:
            embedded.stop()
    return rc


def _proc_stats(pid) -> dict:
    """RSS and USS (bytes) and CPU time (user + system seconds) of an enclave process;
    None for each when there is no pid, the process vanished or cannot be read."""
    import psutil
    out: dict = {"rss": None, "uss": None, "cpu": None}
    if not pid:
        return out
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            if p.status() == psutil.STATUS_ZOMBIE:
                return out
            t = p.cpu_times()
            out["cpu"] = round(t.user + t.system, 3)
            out["rss"] = p.memory_info().rss
            try:
                out["uss"] = p.memory_full_info().uss     # smaps_rollup: cheap on Linux
            except (psutil.AccessDenied, AttributeError):
                pass
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"rss": None, "uss": None, "cpu": None}
    return out


def _size(n) -> str:
    """Bytes, human-readable (1024-based); "-" for None."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B"
    for unit in "KMG":
        n /= 1024
        if n < 1024 or unit == "G":
            break
    return f"{n:.1f}{unit}"


def _ps_lines(info: dict) -> list[str]:
    """The text of ``tvmrt ps`` for ``info`` (enclaves already carrying their stats)."""
    lines = [f"hosts: {info['hosts']}",
             f"{'eid':>4} {'handle':>12} {'name':16} {'type':6} {'state':8} {'pid':>7} "
             f"{'rss':>7} {'uss':>7} {'cpu':>8}"]
    for e in info["enclaves"]:
        cpu = "-" if e.get("cpu") is None else f"{e['cpu']:.2f}s"
        lines.append(f"{e['eid']:>4} {e['handle']:>#12x} {e['name']:16} "
                     f"{'server' if e['type'] else 'normal':6} {e['state']:8} "
                     f"{e['pid'] or '-':>7} {_size(e.get('rss')):>7} "
                     f"{_size(e.get('uss')):>7} {cpu:>8}")
    lines.append(f"{'id':>8} {'kind':6} {'vaddr':>14} {'size':>10} owner lenders")
    for r in info["regions"]:
        lines.append(f"{r['id']:>#8x} {r['kind']:6} {r['vaddr']:>#14x} {r['size']:>#10x} "
                     f"{r['owner']} {r['lenders']}")
    return lines


def _ps(ns) -> int:
    from tvmrt.host import Host
    with Host.connect(ns.socket, embedded=False) as host:
        info = host.ps()
    for e in info["enclaves"]:
        e.update(_proc_stats(e.get("pid")))
    if ns.json:
        print(json.dumps(info, default=lambda b: b.hex()))
    else:
        print("\n".join(_ps_lines(info)))
    return 0


def _bench(ns) -> int:
    from tvmrt import bench
    return bench.main(ns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tvmrt", description="Penglai-TVM enclave IPC on Linux")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("monitor", help="run the monitor daemon in the foreground")
    m.add_argument("--socket", help="listening socket path (default: per-user runtime dir)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--quiet", action="store_true", help="do not announce the socket")
    m.add_argument("--verbose", "-v", action="store_true", help="log events to stderr")
    m.set_defaults(fn=_monitor)

    la = sub.add_parser("launch", help="run Penglai's demo host: CALLER [SERVER [SERVER1]]")
    la.add_argument("eapps", nargs="+", help="eapp names (bundled) or paths")
    la.add_argument("--socket", help="use the monitor on this socket (default: a running "
                    "monitor on the default socket, else an embedded one)")
    la.add_argument("--verbose", "-v", action="store_true")
    la.set_defaults(fn=_launch)

    ps = sub.add_parser("ps", help="list enclaves (with RSS, USS, CPU time) and regions of a "
                        "running monitor")
    ps.add_argument("--socket")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=_ps)

    b = sub.add_parser("bench", help="measure call_enclave against raw floors")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--calls", type=int, default=20000, help="calls per null/4 KiB row")
    b.add_argument("--big-calls", type=int, default=20, help="calls for the 64 MiB row")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    b.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    b.set_defaults(fn=_bench)

    ns = p.parse_args(argv)
    from tvmrt.errors import TvmError
    try:
        return ns.fn(ns)
    except TvmError as exc:
        print(f"tvmrt {ns.cmd}: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
