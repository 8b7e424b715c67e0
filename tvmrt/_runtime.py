"""The runtime inside an enclave process (started by the zygote).

It owns the enclave's socket to the monitor and its :class:`RegionTable`, runs
the eapp's ``main(args)`` once (normal enclave, Penglai's ``EAPP_RETURN``) or
once per call (server enclave, ``SERVER_RETURN``), and turns every way an eapp
can end -- return, raise, ``sys.exit``, being killed -- into something the
monitor reports to whoever waits.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

from . import _memory as memory, _wire as wire
from ._callarg import CallArg
from .errors import MonitorGone, TvmError
from ._regions import RegionTable

NORMAL, SERVER = 0, 1
U64 = (1 << 64) - 1


class EappReturn(BaseException):
    """Raised by EAPP_RETURN to leave main() with a value."""

    def __init__(self, value):
        self.value = value


class ServerReturn(BaseException):
    """Raised by SERVER_RETURN to leave a server's main() with its call_enclave_arg_t."""

    def __init__(self, arg):
        self.arg = arg


class Runtime:
    """State of this enclave process: identity, socket, regions, current call."""

    def __init__(self, sock: socket.socket, spec: dict):
        self.sock = sock
        self.spec = spec
        self.eid = spec["eid"]
        self.handle = spec.get("handle", self.eid)
        self.name = spec["name"]
        self.type = spec["type"]
        self.table = RegionTable()
        self.caller_id = -1
        self.shm = (0, 0)
        self.last_error: TvmError | None = None

    # -- talking to the monitor ------------------------------------------------
    def wait(self) -> dict:
        """Next message that is not an unsolicited grant (those are applied)."""
        while True:
            msg, fds = wire.recv(self.sock, want_fds=True)
            self.table.apply(msg, fds)
            if msg["op"] != "grant":
                return msg

    def request(self, msg: dict) -> dict:
        wire.send(self.sock, msg)
        return self.wait()

    # -- the eapp's main -------------------------------------------------------
    def run_normal(self, entry) -> int:
        m = self.wait()
        if m["op"] != "start":
            raise MonitorGone(f"expected start, got {m['op']!r}")
        args = [0] * 32
        args[10:15] = m["args"]
        try:
            v = entry(args)
        except EappReturn as r:
            v = r.value
        except SystemExit as exc:
            return _exit_code(exc)
        except BaseException as exc:
            traceback.print_exc()
            wire.send(self.sock, {"op": "fault", "why": _why(exc)})
            return 1
        wire.send(self.sock, {"op": "exit", "v": _u64(v)})
        return 0

    def run_server(self, entry) -> int:
        while True:
            try:
                m = self.wait()
            except MonitorGone:
                return 0
            if m["op"] == "e":
                # the monitor refused our last SERVER_RETURN (e.g. a response region we
                # do not own); the caller was told, we say it on stderr
                print(f"tvmrt: server {self.name!r}: {m.get('why')}", file=sys.stderr,
                      flush=True)
                continue
            if m["op"] != "call":
                continue
            loans = [g[1] for g in m.get("g", ())]
            a0, a1, a2 = m["a"]
            args = [0] * 32
            args[10], args[11], args[12] = a0, a1, a2
            args[13], args[14] = self.shm
            self.caller_id = m.get("c", -1)
            try:
                ret = entry(args)
            except ServerReturn as r:
                ret = r.arg
            except SystemExit as exc:
                return _exit_code(exc)
            except BaseException as exc:
                traceback.print_exc()
                for v in loans:
                    self.table.revoke(v)
                wire.send(self.sock, {"op": "fault", "why": _why(exc)})
                self.caller_id = -1
                continue
            if ret is None:
                ret = CallArg()
            if not isinstance(ret, CallArg):
                for v in loans:
                    self.table.revoke(v)
                wire.send(self.sock, {"op": "fault", "why": f"server returned "
                                      f"{type(ret).__name__}, not call_enclave_arg_t"})
                continue
            for v in loans:
                self.table.revoke(v)
            resp = ret.resp_vaddr
            if resp and resp not in loans:
                self.table.revoke(resp)
            vals = ret.to_list()
            for x in vals:
                if type(x) is not int or x < 0 or x > U64:
                    vals = [_u64(x) for x in vals]
                    break
            wire.send(self.sock, {"op": "ret", "a": vals})
            self.caller_id = -1


def _u64(v) -> int:
    try:
        return int(v or 0) & U64
    except (TypeError, ValueError):
        return 0


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def _exit_code(exc: SystemExit) -> int:
    c = exc.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    print(c, file=sys.stderr)
    return 1


#: the runtime of this process (set once by :func:`run`; one enclave per process)
current: Runtime | None = None


def run(fd: int, spec: dict, shm_fd: int | None) -> int:
    """Entry of a freshly forked enclave process.  Returns the process exit code."""
    global current
    sock = socket.socket(fileno=fd)
    rt = current = Runtime(sock, spec)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:
        pass
    shm = spec.get("shm")
    if shm and shm_fd is not None:
        vaddr, size, off = shm
        memory.map_fixed(vaddr, size, shm_fd, off)
        os.close(shm_fd)
        rt.table.add_shared(vaddr, size)
        rt.shm = (vaddr, size)
    path = spec.get("path") or f"<eapp {rt.name}>"
    ns = {"__name__": "__eapp__", "__file__": path, "__builtins__": __builtins__}
    try:
        code = compile(spec["code"], path, "exec")
        exec(code, ns)
        entry = ns.get("main")
        if not callable(entry):
            raise TypeError(f"eapp {path} defines no main(args)")
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:
        traceback.print_exc()
        try:
            wire.send(sock, {"op": "fault", "why": _why(exc)})
        except TvmError:
            pass
        return 1
    try:
        if rt.type == SERVER:
            return rt.run_server(entry)
        return rt.run_normal(entry)
    except MonitorGone:
        return 0
