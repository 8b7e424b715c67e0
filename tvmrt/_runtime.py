"""The runtime inside an enclave process (started by the zygote).

It owns the enclave's channel to the monitor and its :class:`RegionTable`, runs
the eapp's module code (requests work there too: the channel is up before it),
says ``ready``, then runs ``main(args)`` once (normal enclave, Penglai's
``EAPP_RETURN``) or once per call (server enclave, ``SERVER_RETURN``), and turns
every way an eapp can end -- return, a bad return value, raise, ``sys.exit``,
being killed -- into something the monitor reports to whoever waits.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

from . import _memory as memory, _trace
from ._callarg import FIELDS, CallArg
from ._channel import Channel
from ._layout import U64
from ._regions import RegionTable
from .errors import BadExitValue, BadReturn, ChannelError, EnclaveFault, TvmError

NORMAL, SERVER = 0, 1
I64_MIN = -(1 << 63)


class EappReturn(BaseException):
    """Raised by EAPP_RETURN to leave main() with a value."""

    def __init__(self, value):
        self.value = value


class ServerReturn(BaseException):
    """Raised by SERVER_RETURN to leave a server's main() with its call_enclave_arg_t."""

    def __init__(self, arg):
        self.arg = arg


class Runtime:
    """State of this enclave process: identity, channel, regions, current call."""

    def __init__(self, sock: socket.socket, spec: dict):
        self.spec = spec
        self.eid = spec["eid"]
        self.handle = spec.get("handle", self.eid)
        self.name = spec["name"]
        self.type = spec["type"]
        self.table = RegionTable()
        self.chan = Channel(sock, self.table, name="monitor")
        self.caller_id = -1
        self.shm = (0, 0)
        self.last_error: TvmError | None = None
        #: the run's relay (schrodinger) regions as granted at start: [(vaddr, length)]
        self.relay: list[tuple[int, int]] = []

    def request(self, msg: dict, timeout: float | None = None, loan=None) -> dict:
        """One request to the monitor; raises the TvmError it answered."""
        return self.chan.request(msg, timeout=timeout, loan=loan)

    # -- the eapp's main -------------------------------------------------------
    def run_normal(self, entry) -> int:
        while True:
            m = self.chan.next_event()
            if m.get("op") == "start":
                break
        args = [0] * 32
        args[10:15] = m["args"]
        g = m.get("g")
        if g:
            self.relay = [(x[1], x[2]) for x in g]
        try:
            v = entry(args)
        except EappReturn as r:
            v = r.value
        except SystemExit as exc:
            return _exit_code(exc)
        except BaseException as exc:
            self._fault(exc)
            return 1
        try:
            value = exit_value(v)
        except BadExitValue as exc:
            self._fault(exc)
            return 1
        self.chan.notify({"op": "exit", "v": value})
        return 0

    def run_server(self, entry) -> int:
        table = self.table
        while True:
            try:
                m = self.chan.next_event()
            except ChannelError:
                return 0
            op = m.get("op")
            if op == "e":
                # the monitor refused our last SERVER_RETURN (e.g. a response region we
                # do not own); the caller was told, we say it on stderr
                print(f"tvmrt: server {self.name!r}: {m.get('why')}", file=sys.stderr,
                      flush=True)
                continue
            if op != "call":
                if op == "acall":
                    if self._serve_asyn(entry, m):
                        return 0
                continue
            g = m.get("g")
            loans = [x[1] for x in g] if g else ()
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
                self._fault(exc, loans)
                self.caller_id = -1
                continue
            try:
                vals = return_fields(ret)
            except BadReturn as exc:
                self._fault(exc, loans)
                self.caller_id = -1
                continue
            if loans:
                self._give_up(loans)
            resp = vals[4]
            if resp and resp not in loans:
                table.revoke_owned(resp)
            self.chan.notify({"op": "ret", "a": vals})
            self.caller_id = -1

    def _serve_asyn(self, entry, m: dict) -> bool:
        """One asynchronous call (``asyn_enclave_call``): ``main`` gets the region like a
        call's, but the region is this server's for good (nothing goes back at the
        return) and the return value goes nowhere (a response region it names is
        freed).  True when the eapp called ``sys.exit`` (the server ends)."""
        a0, a1, a2 = m["a"]
        args = [0] * 32
        args[10], args[11], args[12] = a0, a1, a2
        args[13], args[14] = self.shm
        self.caller_id = m.get("c", -1)
        try:
            try:
                ret = entry(args)
            except ServerReturn as r:
                ret = r.arg
            vals = return_fields(ret)
        except SystemExit:
            return True
        except BaseException as exc:
            self._fault(exc)
            return False
        finally:
            self.caller_id = -1
        resp = vals[4]
        if resp:
            self.table.revoke_owned(resp)
        self.chan.notify({"op": "ret", "a": vals})
        return False

    def _fault(self, exc: BaseException, loans=()) -> None:
        """Tell the monitor (and stderr) how the eapp failed: a raise with its
        traceback, a value it may not return with the reason and its own code.  Loans
        of the call go back with it.  When the monitor is gone there is nobody to tell:
        the enclave is about to be killed with it, and a traceback on the user's
        terminal would only be noise."""
        if isinstance(exc, ChannelError) or self.chan.down:
            return
        if isinstance(exc, (BadExitValue, BadReturn)):
            print(f"tvmrt: enclave {self.name!r}: {exc.reason}", file=sys.stderr,
                  flush=True)
            msg = {"op": "fault", "why": exc.reason, "c": exc.code}
        else:
            traceback.print_exc()
            msg = {"op": "fault", "why": _why(exc)}
        self._give_up(loans)
        self.chan.notify(msg)

    def _give_up(self, loans) -> None:
        for v in loans:
            self.table.revoke_owned(v)


def exit_value(v) -> int:
    """The u64 exit value for what ``main`` returned, or :class:`BadExitValue`.

    ``None`` is 0 (a ``main`` without ``return``); a negative int in the signed 64-bit
    range wraps like C's ``unsigned long``; anything else is an error that says so.
    """
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadExitValue(f"main returned {v!r:.60} ({type(v).__name__}), "
                           f"not an integer exit value")
    if v < I64_MIN or v > U64:
        raise BadExitValue(f"main returned {v:#x}, outside the 64-bit exit value range")
    return int(v) & U64


def return_fields(ret) -> list[int]:
    """The six u64 fields of a server's return value (None: all zero), or
    :class:`BadReturn`."""
    if type(ret) is CallArg:                     # the call path: six plain u64s
        vals = [ret.req_arg, ret.resp_val, ret.req_vaddr, ret.req_size, ret.resp_vaddr,
                ret.resp_size]
        for x in vals:
            if type(x) is not int or x < 0 or x > U64:
                break
        else:
            return vals
    if ret is None:
        return [0] * 6
    if not isinstance(ret, CallArg):
        raise BadReturn(f"server returned {type(ret).__name__}, not call_enclave_arg_t")
    vals = ret.to_list()
    for i, x in enumerate(vals):
        if type(x) is not int or x < 0 or x > U64:
            if isinstance(x, bool) or not isinstance(x, int) or x < I64_MIN or x > U64:
                raise BadReturn(f"server returned {FIELDS[i]} = {x!r:.40}, "
                                f"not an unsigned 64-bit integer")
            vals[i] = int(x) & U64
    return vals


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


#: the runtime of this process: one enclave per process, and Penglai's eapp API has
#: no context argument, so the eapp functions find it here (set once by :func:`run`)
current: Runtime | None = None


def _remember_source(path: str, code) -> None:
    """Put the eapp's source in ``linecache``: its tracebacks show their lines although
    the sandbox does not let the enclave read its own file (``mtime`` None: checkcache
    keeps the entry)."""
    import linecache
    try:
        text = code.decode("utf-8", "replace") if isinstance(code, bytes) else str(code)
    except Exception:
        return
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[path] = (len(text), None, lines, path)


#: what a warm process compiles and runs once, to be ready for the real eapp
_REHEARSAL = b"def main(args):\n    return args[10] + 1\n"


def rehearse(sock: socket.socket) -> None:
    """In a warm process (:mod:`tvmrt.monitor.zygote`), before it is an enclave: go
    through :func:`run`'s set-up once with a throwaway runtime and eapp.  The pages
    the set-up writes (the objects it touches are the zygote's, shared copy-on-write,
    and the allocator's pools) are copied now, off the create's path: a create then
    costs ~0.5 ms less (docs/design.md, "Creating an enclave").  ``sock`` is only
    wrapped, never used."""
    rt = Runtime(sock, {"eid": 0, "name": "", "type": NORMAL})
    rt.table.refresh = None          # no cycle left behind
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except Exception:
        pass
    _remember_source("<rehearsal>", _REHEARSAL)
    import linecache
    linecache.cache.pop("<rehearsal>", None)
    ns = {"__name__": "__eapp__", "__file__": "<rehearsal>", "__builtins__": __builtins__}
    exec(compile(_REHEARSAL, "<rehearsal>", "exec"), ns)
    ns["main"]([0] * 32)


def run(fd: int, spec: dict, shm_fd: int | None, started: int | None = None) -> int:
    """Entry of a freshly forked enclave process.  Returns the process exit code.

    ``started``: an fd closed once ``ready`` is sent (the zygote waits for that before
    it forks the next warm process, so that the fork does not compete with this start
    for a CPU)."""
    global current
    sock = socket.socket(fileno=fd)
    rt = current = Runtime(sock, spec)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
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
    _remember_source(path, spec["code"])
    ns = {"__name__": "__eapp__", "__file__": path, "__builtins__": __builtins__}
    try:
        code = compile(spec["code"], path, "exec")
        if _trace.FD is not None:
            _trace.mark("c_compiled")
        exec(code, ns)
        entry = ns.get("main")
        if not callable(entry):
            raise EnclaveFault(f"eapp {path} defines no main(args)")
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:
        traceback.print_exc()
        why = exc.reason if isinstance(exc, EnclaveFault) else _why(exc)
        try:
            rt.chan.notify({"op": "fault", "why": why})
        except TvmError:
            pass
        return 1
    if _trace.FD is not None:
        _trace.mark("c_ready")
    try:
        rt.chan.notify({"op": "ready"})
        if started is not None:
            os.close(started)
        if rt.type == SERVER:
            return rt.run_server(entry)
        return rt.run_normal(entry)
    except ChannelError:
        return 0
