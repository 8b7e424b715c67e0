"""The ``tvmrt`` command: monitor, launch, ps, bench, stress, and attestation's verify,
measure, pubkey."""
from __future__ import annotations

import argparse
import json
import sys

from tvmrt.monitor.config import ISOLATION_MODES

_ISOLATION_HELP = ("transfer mode of relay regions: mprotect (default: revoke = PROT_NONE, "
                   "the mapping stays) or strict (revoke unmaps, every grant sends the fd "
                   "again, and the monitor checks /proc/PID/maps of earlier holders first)")


def _monitor(ns) -> int:
    """``tvmrt monitor``.  With ``--own-socket-dir`` (how :mod:`tvmrt._embedded` starts
    a private monitor) the socket's directory is removed when the monitor ends, however
    it ends short of SIGKILL: the directory is the monitor's, no one else removes it if
    its host died first.

    ``--key FILE``: the monitor's Ed25519 key, made (0600) if there is no such file, so
    that its reports verify with the same public key across restarts and ``get_key``
    gives the same keys; a file it cannot use is refused with one line, exit 1.
    Without it, a fresh key for every start."""
    import os
    import signal

    from tvmrt.errors import TvmError
    own_dir = os.path.dirname(os.path.abspath(ns.socket)) if (
        ns.own_socket_dir and ns.socket) else None
    if own_dir is not None:
        # A SIGTERM before the daemon takes over its stop signals (PDEATHSIG: the host
        # died while we start) must still reach the clean-up below.  The embedded
        # monitor starts with SIGTERM blocked: one that came already is delivered at the
        # unblock, inside the try.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if own_dir is not None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        from tvmrt.monitor.daemon import Daemon
        # the key file is read by the daemon once its zygote runs (see Daemon._make_core)
        return Daemon(ns.socket, verbose=ns.verbose, key_file=ns.key,
                      sandbox=not ns.no_sandbox, isolation=ns.isolation,
                      allow_uids=ns.allow_uid or ()).run(ready_fd=ns.ready_fd,
                                                         announce=not ns.quiet)
    except TvmError as exc:
        print(f"tvmrt monitor: {exc.reason}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        if ns.ready_fd is None:
            raise
        return 1                        # who waited for "ready" is gone: nobody to serve
    finally:
        if own_dir is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)     # ending already
            _remove_own_dir(own_dir, ns.socket)


def _remove_own_dir(d: str, sock: str) -> None:
    """Remove an embedded monitor's private socket directory once the daemon is over:
    the socket, if the daemon ended without removing it (nothing else binds in that
    directory), then the directory, if that leaves it empty (anything else in it is not
    ours).  A directory already gone is fine."""
    import os
    import stat
    try:
        if stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.unlink(sock)
    except OSError:
        pass
    try:
        os.rmdir(d)
    except OSError:
        pass


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


class _Stopped(BaseException):
    """SIGTERM or SIGHUP reached ``tvmrt launch``: unwind like ^C does, so the enclaves,
    the embedded monitor and its directory go away before the process ends."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_signals():
    import signal
    return (signal.SIGTERM, signal.SIGHUP)


def _raise_stopped(signum, frame):
    import signal
    # Once: a second signal must not cut the tear-down short.
    for s in _stop_signals():
        signal.signal(s, signal.SIG_IGN)
    raise _Stopped(signum)


def _check_eapp(name: str) -> None:
    """Refuse, with InvalidArgument and a one-line reason, an eapp that cannot be one:
    unreadable, empty, binary or not Python.

    ``tvmrt launch`` checks its files before any enclave starts: otherwise an empty file
    is Penglai's "error when initializing enclave elf" and a file that does not compile
    fails in the enclave, which prints the compiler's traceback."""
    from tvmrt.errors import InvalidArgument
    from tvmrt.host import resolve_eapp
    code, shown = resolve_eapp(name)          # InvalidArgument "cannot read eapp ..."
    if not code.strip():
        raise InvalidArgument(f"eapp {name!r} is empty: an eapp is a Python file that "
                              f"defines main(args)")
    if b"\0" in code:
        raise InvalidArgument(f"eapp {name!r} is a binary file, not Python source")
    try:
        compile(code, shown, "exec", dont_inherit=True)
    except SyntaxError as exc:
        line = f" (line {exc.lineno})" if exc.lineno else ""
        raise InvalidArgument(f"eapp {name!r} is not valid Python: {exc.msg}{line}") from None
    except ValueError as exc:
        raise InvalidArgument(f"eapp {name!r} is not valid Python: {exc}") from None


def _launch(ns) -> int:
    """``tvmrt launch``: Penglai's demo host on a running monitor, else an embedded one.

    Every failure of its own is one line on stderr (``tvmrt launch: ...``) and a non-zero
    exit: a bad eapp file, no monitor at ``--socket``, the monitor going away meanwhile
    (1); SIGTERM and SIGHUP stop it cleanly (128 + the signal), like ^C (130).

    ``--key FILE`` starts an embedded monitor with that key (``tvmrt monitor --key``)
    even if one is running; ``--report FILE`` writes the host's report of the caller
    (nonce 1234, the one whose signature it prints) as JSON for ``tvmrt verify``."""
    import os
    import signal

    from tvmrt import _demo as demo, penglai
    from tvmrt._embedded import EmbeddedMonitor
    from tvmrt._paths import default_socket_path
    from tvmrt.errors import MonitorGone
    from tvmrt.host import _dial

    names = ns.eapps
    stop_demo = names[0] == "test-stop"     # Penglai's `./test-stop loop`
    if stop_demo:
        names = names[1:] or ["loop"]
        if len(names) != 1:
            print("tvmrt launch: test-stop runs one eapp (default: loop)", file=sys.stderr)
            return 2
    if len(names) > 3:
        print("tvmrt launch: at most three eapps: CALLER [SERVER [SERVER1]]",
              file=sys.stderr)
        return 2
    if ns.key is not None and ns.socket is not None:
        print("tvmrt launch: --key starts an embedded monitor with that key; a monitor "
              "at --socket has its own key (give one or the other)", file=sys.stderr)
        return 2
    if ns.report is not None and len(names) < 2:
        print("tvmrt launch: --report is for the test-caller demo (CALLER SERVER "
              "[SERVER1]): the host attests the caller", file=sys.stderr)
        return 2
    if len(names) == 2 and names[1].isdigit():
        if not 1 <= int(names[1]) <= 64:
            print("tvmrt launch: EAPP N runs 1 .. 64 enclaves at once", file=sys.stderr)
            return 2
    for name in names:
        if not name.isdigit():
            _check_eapp(name)
    old_handlers = {s: signal.signal(s, _raise_stopped) for s in _stop_signals()}
    embedded = None
    opened = False
    try:
        path = ns.socket or default_socket_path()
        running = False
        if ns.key is None:              # a key file asks for a monitor of its own
            try:
                _dial(path).close()
                running = True
            except MonitorGone:
                if ns.socket is not None:
                    raise
        if not running:
            embedded = EmbeddedMonitor(verbose=ns.verbose, key_file=ns.key,
                                       sandbox=not ns.no_sandbox,
                                       isolation=ns.isolation).start()
            path = embedded.path
        with demo.monitor_loss_raises():
            if penglai.open_device(path) != 0:
                return 1
            opened = True
            if stop_demo:
                return demo.test_stop(names[0])
            if len(names) == 2 and names[1].isdigit():
                return demo.host(names[0], int(names[1]))     # ./host ELF N
            stem = os.path.basename(names[0]).removesuffix(".py")
            if len(names) == 1 and stem in ("relay_page", "mem"):
                return demo.host(names[0], 1)
            if len(names) == 1:
                return demo.run_one(names[0])
            return demo.test_caller(*names, report_file=ns.report)
    except MonitorGone:
        if not opened:
            raise                       # no monitor there: main says why
        print("tvmrt launch: the monitor went away", file=sys.stderr)
        return 1
    except _Stopped as stop:
        return 128 + stop.signum
    finally:
        for s in old_handlers:          # tearing down already: a stop signal is moot
            signal.signal(s, signal.SIG_IGN)
        penglai.close_device()
        if embedded is not None:
            embedded.stop()
        for s, h in old_handlers.items():
            signal.signal(s, h)


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
    key = info.get("public_key")
    lines = [f"hosts: {info['hosts']}  sandbox: {info.get('sandbox', '-')}"
             + (f"   public key: {key.hex()}" if key else ""),
             f"{'eid':>4} {'handle':>12} {'name':16} {'type':6} {'inst':>4} {'state':8} "
             f"{'pid':>7} {'rss':>7} {'uss':>7} {'cpu':>8} sandbox"]
    for e in info["enclaves"]:
        cpu = "-" if e.get("cpu") is None else f"{e['cpu']:.2f}s"
        inst = "-" if e.get("instance") is None else e["instance"]
        lines.append(f"{e['eid']:>4} {e['handle']:>#12x} {e['name']:16} "
                     f"{'server' if e['type'] else 'normal':6} {inst:>4} {e['state']:8} "
                     f"{e['pid'] or '-':>7} {_size(e.get('rss')):>7} "
                     f"{_size(e.get('uss')):>7} {cpu:>8} {e.get('sandbox', '-')}")
    lines.append(f"{'id':>8} {'kind':6} {'vaddr':>14} {'size':>10} owner lenders")
    for r in info["regions"]:
        lines.append(f"{r['id']:>#8x} {r['kind']:6} {r['vaddr']:>#14x} {r['size']:>#10x} "
                     f"{r['owner']} {r['lenders']}")
    m = info.get("monitor")
    if m:
        lines.append(f"monitor: pid {m['pid']}  fds {m['fds']}  rss {_size(m['rss'])}  "
                     f"segments {m['segments']}  sockets {m['sockets']}")
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


#: ``tvmrt verify`` exit codes, one per reason a report fails (0: it verifies; 1: the
#: report file or an argument cannot be used; 2: usage, argparse's)
VERIFY_EXIT = {"MalformedReport": 3, "BadSignature": 4, "WrongKey": 5,
               "MeasurementMismatch": 6, "NonceMismatch": 7}
_VERIFY_WHAT = {"MalformedReport": "malformed report", "BadSignature": "bad signature",
                "WrongKey": "wrong key", "MeasurementMismatch": "measurement mismatch",
                "NonceMismatch": "nonce mismatch"}


def _public_key_arg(arg: str) -> bytes:
    """``--key PUB``: 64 hex digits, or a file holding them, a PEM public key, or a
    monitor's key file (its public half is used).  InvalidArgument if none of these."""
    import os

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    from tvmrt.errors import InvalidArgument
    try:
        if len(arg) == 64:
            return bytes.fromhex(arg)
    except ValueError:
        pass
    if not os.path.exists(arg):
        raise InvalidArgument(f"--key {arg!r} is neither 64 hex digits nor a file")
    try:
        with open(arg, "rb") as f:
            data = f.read(1 << 16)
    except OSError as exc:
        raise InvalidArgument(f"cannot read key {arg}: {exc.strerror}") from None
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    if b"PRIVATE KEY" in data:
        from tvmrt.monitor.keyfile import load_key, public_key
        return public_key(load_key(arg))
    try:
        pub = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pub = None
    if not isinstance(pub, Ed25519PublicKey):
        raise InvalidArgument(f"key {arg} holds no Ed25519 public key (64 hex digits, a "
                              f"PEM public key or a monitor key file)")
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verify(ns) -> int:
    """``tvmrt verify REPORT --measurement HEX [--key PUB] [--nonce N]``: one line, and
    exit 0 if the report verifies, else the reason's line and its code (VERIFY_EXIT)."""
    from tvmrt import _attest
    from tvmrt.errors import InvalidArgument, VerifyError
    try:
        measurement = bytes.fromhex(ns.measurement)
    except ValueError:
        measurement = b""
    if len(measurement) != 32:
        raise InvalidArgument("--measurement must be 64 hex digits (tvmrt measure prints it)")
    key = None if ns.key is None else _public_key_arg(ns.key)
    if ns.nonce is not None and not 0 <= ns.nonce < 1 << 64:
        raise InvalidArgument("--nonce must be 0 .. 2**64-1")
    try:
        if ns.report == "-":
            text = sys.stdin.buffer.read(1 << 20)
        else:
            with open(ns.report, "rb") as f:
                text = f.read(1 << 20)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {ns.report}: {exc.strerror}") from None
    try:
        rep = _attest.report_from_json(text)
        _attest.verify_report(rep, measurement=measurement, key=key, nonce=ns.nonce)
    except VerifyError as exc:
        kind = type(exc).__name__
        print(f"tvmrt verify: {_VERIFY_WHAT[kind]}: {exc.reason}", file=sys.stderr)
        return VERIFY_EXIT[kind]
    how = ("the expected key" if key is not None else
           "the report's own key; pass --key to check who signed")
    kind = "server" if rep["type"] else "normal"
    print(f"OK: {kind} enclave {rep['name']!r}, nonce {rep['nonce']}, signed by "
          f"{rep['public_key'].hex()} ({how})")
    return 0


def _measure(ns) -> int:
    """``tvmrt measure EAPP --name NAME [--server]``: the measurement the monitor gives
    that eapp created under that name and type, in hex (tvmrt/_attest.py's layout)."""
    from tvmrt._attest import NAME_MAX, measure
    from tvmrt.errors import InvalidArgument
    from tvmrt.host import resolve_eapp
    name = ns.name
    if not name or "\0" in name or len(name.encode()) > NAME_MAX:
        raise InvalidArgument(f"--name must be 1..{NAME_MAX} bytes, no NUL")
    code, _ = resolve_eapp(ns.eapp)
    print(measure(1 if ns.server else 0, name, code).hex())
    return 0


def _pubkey(ns) -> int:
    """``tvmrt pubkey FILE``: the public key of a monitor key file, 64 hex digits."""
    from tvmrt.monitor.keyfile import load_key, public_key
    print(public_key(load_key(ns.file)).hex())
    return 0


def _bench(ns) -> int:
    from tvmrt import bench  # the main table; --peers, --plot, --throughput, --scale add theirs
    return bench.main(ns)


def _stress(ns) -> int:
    from tvmrt import _stress
    return _stress.main(ns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tvmrt", description="Penglai-TVM enclave IPC on Linux")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("monitor", help="run the monitor daemon in the foreground")
    m.add_argument("--socket", help="listening socket path (default: per-user runtime dir)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--quiet", action="store_true", help="do not announce the socket")
    m.add_argument("--verbose", "-v", action="store_true", help="log events to stderr")
    m.add_argument("--key", metavar="FILE", help="the monitor's Ed25519 key (PEM, 0600), "
                   "made if missing: reports verify with the same key across restarts "
                   "(default: a fresh key per start)")
    m.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                   help="also serve hosts of this uid (repeatable); their enclaves run as "
                   "this monitor's uid (default: this uid and root only)")
    m.add_argument("--no-sandbox", action="store_true",
                   help="debugging only: enclaves run without the sandbox (dumpable, no "
                   "Landlock, no seccomp) and the monitor and zygote are dumpable")
    m.add_argument("--isolation", choices=ISOLATION_MODES, default="mprotect",
                   help=_ISOLATION_HELP)
    # embedded monitors (tvmrt._embedded): remove the socket's directory on exit
    m.add_argument("--own-socket-dir", action="store_true", help=argparse.SUPPRESS)
    m.set_defaults(fn=_monitor)

    la = sub.add_parser("launch", help="run Penglai's demo host: CALLER [SERVER [SERVER1]], "
                        "or EAPP N (N enclaves at once, demo/host: relay_page, mem 5)")
    la.add_argument("eapps", nargs="+", help="eapp names (bundled) or paths; EAPP N runs N "
                    "enclaves of EAPP at once")
    la.add_argument("--socket", help="use the monitor on this socket (default: a running "
                    "monitor on the default socket, else an embedded one)")
    la.add_argument("--verbose", "-v", action="store_true")
    la.add_argument("--key", metavar="FILE", help="start an embedded monitor with this key "
                    "file (as tvmrt monitor --key)")
    la.add_argument("--report", metavar="FILE", help="write the host's report of the "
                    "caller (nonce 1234) as JSON, for tvmrt verify")
    la.add_argument("--no-sandbox", action="store_true",
                    help="an embedded monitor runs its enclaves without the sandbox")
    la.add_argument("--isolation", choices=ISOLATION_MODES, default="mprotect",
                    help="an embedded monitor's transfer mode (see tvmrt monitor)")
    la.set_defaults(fn=_launch)

    ps = sub.add_parser("ps", help="list enclaves (with RSS, USS, CPU time) and regions of a "
                        "running monitor")
    ps.add_argument("--socket")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=_ps)

    v = sub.add_parser("verify", help="check an attestation report (JSON): signature, "
                       "key, measurement, nonce; exit 0 or the reason's code")
    v.add_argument("report", metavar="REPORT", help="report file (JSON), - for stdin")
    v.add_argument("--measurement", required=True, metavar="HEX",
                   help="the expected measurement (tvmrt measure prints it)")
    v.add_argument("--key", metavar="PUB", help="the expected monitor public key: 64 hex "
                   "digits or a file (hex, PEM public key, or the monitor's key file)")
    v.add_argument("--nonce", type=int, help="the expected nonce")
    v.set_defaults(fn=_verify)

    me = sub.add_parser("measure", help="print the measurement of an eapp created under "
                        "a name and type")
    me.add_argument("eapp", help="eapp name (bundled) or path")
    me.add_argument("--name", required=True, help="the enclave's name")
    me.add_argument("--server", action="store_true", help="a server enclave (default: normal)")
    me.set_defaults(fn=_measure)

    pk = sub.add_parser("pubkey", help="print the public key of a monitor key file")
    pk.add_argument("file", metavar="FILE")
    pk.set_defaults(fn=_pubkey)

    b = sub.add_parser("bench", help="measure call_enclave against raw floors")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--calls", type=int, default=20000, help="calls per null/4 KiB row")
    b.add_argument("--big-calls", type=int, default=20, help="calls for the 64 and 256 MiB "
                   "rows that touch every page")
    b.add_argument("--creates", type=int, default=50, help="timed creates for the "
                   "create-to-ready row")
    b.add_argument("--burst", type=int, metavar="N", help="enclaves created back to back "
                   "for the burst figure (default 200, --quick 20; at most 1000)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    b.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    b.add_argument("--peers", action="store_true", help="adds a table to the run: tvmrt's "
                   "null call and 64 MiB loan next to multiprocessing.Pipe, pyzmq REQ/REP "
                   "(direct and brokered) and iceoryx2 request-response "
                   "(pip install 'tvmrt[peers]')")
    b.add_argument("--plot", metavar="FILE.png", help="adds to the run: latency against "
                   "region size, loaning vs copying, drawn to FILE.png "
                   "(pip install 'tvmrt[plot]')")
    b.add_argument("--throughput", action="store_true", help="adds to the run: aggregate "
                   "calls/s with 1, 2, 4, 16, 64 caller/server pairs and one server of 1, 2, "
                   "4 instances")
    b.add_argument("--scale", type=int, metavar="N", help="adds to the run: a pair's call "
                   "rate with 10 and with N live enclaves, monitor and enclave memory")
    b.add_argument("--no-sandbox", action="store_true",
                   help="the embedded monitor runs the enclaves without the sandbox")
    b.add_argument("--sandbox-cost", action="store_true",
                   help="also run the default mode's rows with the enclaves unsandboxed "
                   "(rows [no sandbox], with their ratio to the sandboxed ones): the "
                   "sandbox's cost in the same run")
    b.add_argument("--isolation", choices=ISOLATION_MODES + ("both",), default="both",
                   help="transfer mode(s) to measure: both (default) runs the rows in each "
                   "mode against the same floors, side by side")
    b.set_defaults(fn=_bench)

    st = sub.add_parser("stress", help="host processes, server instances and callers "
                        "loaning checked regions while enclaves are killed at random")
    st.add_argument("--socket", help="use the monitor on this socket (default: a private one)")
    st.add_argument("--hosts", type=int, default=2, help="host processes")
    st.add_argument("--callers", type=int, default=3, help="caller enclaves per host")
    st.add_argument("--calls", type=int, default=500, help="calls per caller")
    st.add_argument("--instances", type=int, default=2, help="server instances per host")
    st.add_argument("--max-pages", type=int, default=16384,
                    help="largest loaned region, in pages (sizes are random from 1 page)")
    st.add_argument("--duration", type=float, default=20.0,
                    help="seconds of killing (the calls go on to the end)")
    st.add_argument("--no-chaos", action="store_true", help="kill nothing")
    st.set_defaults(fn=_stress)

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
