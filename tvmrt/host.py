"""The Pythonic host API: connect to a monitor, make memory, create and run enclaves.

Example::

    from tvmrt.host import Host, SERVER
    with Host.connect() as host:                # or Host.connect(embedded=True)
        shm = host.shmget(0x4000)
        shm.view[:4] = (11111).to_bytes(4, "little")
        rel = host.schrodinger_get(0x4000)
        srv = host.create("server", name="test-server", type=SERVER)
        enc = host.create("caller", name="test-caller", shm=shm)
        enc.set_mem_arg(rel)
        print(enc.run())                       # exit value; raises EnclaveFault etc.

Every object that holds something in the monitor (regions, enclaves) is released
when the :class:`Host` closes (and by the monitor if this process dies).
Errors are :class:`~tvmrt.errors.TvmError` subclasses.
"""
from __future__ import annotations

import importlib.resources
import os
import socket
import stat
import threading
from pathlib import Path

from . import _memory as memory, _wire as wire
from ._args import check_seconds, check_u64
from ._channel import Channel
from ._layout import U64
from ._paths import default_socket_path
from ._regions import RegionTable
from .errors import (
    BadSize,
    ChannelError,
    InvalidArgument,
    MonitorGone,
    NotOwned,
    NotPermitted,
    RegionLoaned,
)

#: ``run`` returned because the eapp handed its relay page back (Penglai's 1); also the
#: only rerun reason (``set_rerun_arg``)
RETURN_USER_RELAY_PAGE = 1
NORMAL = 0
SERVER = 1


class _Region:
    """A region the monitor made for this host, mapped at the same address everywhere."""

    kind = ""
    _ops: tuple[str, str, str] = ("", "", "")

    def __init__(self, host: Host, rid: int, address: int, size: int):
        self.host = host
        self.id = rid
        self.address = address
        self.size = size
        self.attached = False

    def attach(self) -> int:
        """Map the region into this process (at :attr:`address`); returns the address.

        Raises BadState if it is attached already, RegionLoaned (schrodinger) while an
        enclave holds it."""
        r = self.host._request({"op": self._ops[0], "id": self.id})
        self.attached = True
        return r["vaddr"]

    def detach(self) -> None:
        """Unmap it from this process; views taken from it become unusable.

        Raises BadState if it is not attached.  A schrodinger region may be detached
        while an enclave holds it: when it comes back it stays detached."""
        self.host._request({"op": self._ops[1], "id": self.id})   # its "d" unmaps here
        self.attached = False

    def revoke(self) -> None:
        """Revoke the id (``shmctl`` / ``schrodinger_ctl``); BadState while attached,
        RegionLoaned while an enclave holds it."""
        self.host._request({"op": self._ops[2], "id": self.id})

    def remove(self) -> None:
        """Detach if attached, then revoke the id."""
        if self.attached:
            self.detach()
        self.revoke()

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the whole region.

        Checked: raises NotOwned if this process may not touch it now.  The view
        (and every slice or cast of it) raises ``ValueError`` while the region is
        away (an enclave runs with it) and works again when it is back, like a C
        pointer; once the region is detached or removed it is dead for good.  It
        never touches memory that is not ours."""
        if not self.attached:
            raise NotOwned(f"{self.kind} region {self.id:#x} is not attached here")
        return self.host.table.view(self.address, self.size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.remove()
        except ChannelError:
            pass


class SharedMemory(_Region):
    """Plain shared memory (``shmget``): mapped by the host and any enclaves given it,
    all at once."""

    kind = "shm"
    _ops = ("shmat", "shmdt", "shmctl")


class Schrodinger(_Region):
    """A schrodinger (relay) region: the host's until an enclave runs with it, the
    enclave's during the run, the host's again after."""

    kind = "relay"
    _ops = ("sat", "sdt", "sctl")

    @property
    def owned(self) -> bool:
        """True when this process may touch it now (attached and not held by an
        enclave)."""
        return self.attached and self.host.table.owns(self.address)

    def remove(self) -> None:
        """Detach if attached, then revoke the id.  RegionLoaned, with nothing
        changed, while an enclave holds it."""
        if self.attached and not self.host.table.owns(self.address):
            raise RegionLoaned(f"schrodinger region {self.id:#x} is held by an enclave")
        super().remove()


class Enclave:
    """An enclave created by this host (a process started by the monitor)."""

    def __init__(self, host: Host, reply: dict, name: str, etype: int):
        self.host = host
        self.eid = reply["eid"]
        self.handle = reply["handle"]
        self.measurement = reply["measurement"]
        #: processes serving this enclave's name (a server's instances; 1 otherwise)
        self.instances = reply.get("instances", 1)
        self.name = name
        self.type = etype
        self.retval: int | None = None
        self._mem: tuple[Schrodinger, int, int] | None = None
        #: True after ``run`` returned 1 because the eapp called eapp_return_relay_page:
        #: the schrodinger region is this host's until ``set_rerun_arg(1)`` and ``run``
        self.relay_returned = False
        self._rerun = 0
        self._ran_mem: tuple[Schrodinger, int, int] | None = None

    def set_rerun_arg(self, reason: int = RETURN_USER_RELAY_PAGE) -> None:
        """Penglai's ``PLenclave_set_rerun_arg``: make the next :meth:`run` continue the
        enclave that returned its relay page (reason 1, RETURN_USER_RELAY_PAGE, the
        only one; another is refused by that run with InvalidArgument).  Like
        Penglai's, it stays set: clear it with ``set_rerun_arg(0)``."""
        self._rerun = check_u64(reason, "reason")

    def set_mem_arg(self, region: Schrodinger, offset: int = 0, size: int | None = None):
        """Bind a schrodinger region (window ``offset``, ``size``) to the next run."""
        if not isinstance(region, Schrodinger):
            raise InvalidArgument("set_mem_arg takes a Schrodinger region")
        offset = check_u64(offset, "offset")
        size = region.size - offset if size is None else check_u64(size, "size")
        self._mem = (region, offset, size)

    def run(self, timeout: float | None = None) -> int:
        """Run a normal enclave to its end; returns its exit value (u64).

        Returns 1 with :attr:`relay_returned` set when the eapp called
        ``eapp_return_relay_page`` (Penglai's convention): the schrodinger region is
        back here, the enclave waits; :meth:`set_rerun_arg` (1) and ``run`` again
        continue it with the region at the same address (see docs/protocol.md).

        The bound schrodinger region is revoked from this process for the run and is
        back (with the enclave's writes) when the enclave ends, also on error.  Raises
        EnclaveFault (with the reason) if the eapp raised, exited or was killed,
        BadExitValue if main returned something that is not an exit value, Timeout
        after ``timeout`` seconds (the enclave goes on; the region comes back when it
        ends), ChannelClosed if the host is closed meanwhile from another thread.
        """
        if self._rerun:
            return self._continue(timeout)
        msg: dict = {"op": "run", "handle": self.handle}
        loan = None
        if timeout is not None:
            msg["timeout"] = check_seconds(timeout)
        self._ran_mem = self._mem
        if self._mem is not None:
            region, off, size = self._mem
            msg["mem"] = [region.id, off, size]
            if region.attached:
                try:
                    loan = self.host.table.lend(region.address, region.size)
                except NotOwned:
                    raise RegionLoaned(f"schrodinger region {region.id:#x} is held by "
                                       f"an enclave") from None
        return self._ended(self.host._request(msg, timeout=timeout, loan=loan))

    def _ended(self, r: dict) -> int:
        if r.get("relay"):
            # eapp_return_relay_page: the region is back here; the enclave waits
            self.relay_returned = True
            return 1
        self.relay_returned = False
        self.retval = r["retval"]
        return r["retval"]

    def _continue(self, timeout: float | None) -> int:
        """The rerun: lend the schrodinger region of the paused run again, continue."""
        msg: dict = {"op": "rerun", "handle": self.handle, "reason": self._rerun}
        if timeout is not None:
            msg["timeout"] = check_seconds(timeout)
        loan = None
        mem = self._ran_mem
        if mem is not None and mem[0].attached and self.relay_returned:
            msg["mem"] = mem[0].id
            try:
                loan = self.host.table.lend(mem[0].address, mem[0].size)
            except NotOwned:
                raise RegionLoaned(f"schrodinger region {mem[0].id:#x} is held by "
                                   f"an enclave") from None
        return self._ended(self.host._request(msg, timeout=timeout, loan=loan))

    def attest(self, nonce: int) -> dict:
        """This enclave's attestation report for ``nonce`` (u64), signed by the monitor.

        A dict: ``measurement`` (32 bytes: SHA-256 over a prefix, type, name and the
        exact code, see :func:`tvmrt.measure`), ``nonce``, ``name``, ``type``,
        ``public_key`` (the monitor's Ed25519 key, 32 bytes) and ``sig`` (64 bytes,
        Ed25519 over the bytes tvmrt/_attest.py defines).  Anyone checks it with
        :func:`tvmrt.verify_report` or ``tvmrt verify`` (JSON:
        :func:`tvmrt.report_to_json`).

        Any live enclave can be attested -- fresh, running, a server (its handle: every
        instance has the same measurement) -- where Penglai allows only FRESH or STOPPED
        ones and no server: the report signs the measurement taken at ``create``, never
        a re-measured live address space, so the state does not matter.  An enclave
        that ended raises what ended it."""
        return self.host._request({"op": "attest", "handle": self.handle,
                                   "nonce": check_u64(nonce, "nonce")})["report"]

    def stop(self) -> list[int]:
        """Stop the enclave's process (SIGSTOP to its process group), wherever it is.

        While it waits in ``call_enclave``, the servers running its call chain (down to
        the innermost call) are stopped with it: the chain is one thread of control, as
        on Penglai, where the caller's thread runs the server.  A server already stopped
        by a stop of its own stays that one's.  Returns the handles stopped (this one
        first).  Deadlines keep running: a caller of a stopped server gets Timeout when
        its deadline passes, and a ``run(timeout=...)`` of a stopped enclave too.

        On a server's pool handle every instance is stopped; a stopped instance takes no
        call (callers queue, under the queue deadline).  Raises Stopped if it is stopped
        already, BadState if it cannot be (not started yet), and what ended it if it has
        ended."""
        return self.host._request({"op": "stop", "handle": self.handle})["stopped"]

    def resume(self) -> list[int]:
        """Continue what :meth:`stop` stopped (SIGCONT); returns the handles continued.

        Raises NotStopped if it is not stopped, or was stopped only as a server of
        another enclave's chain (that enclave is the one to resume)."""
        return self.host._request({"op": "resume", "handle": self.handle})["resumed"]

    @property
    def state(self) -> str:
        """The monitor's state of this enclave now: ``starting``, ``created`` (ready to
        run), ``running``, ``idle`` (a server between calls), ``serving``, ``stopped``
        or ``done`` (ended: no longer listed, or waiting to be reaped).  One ``ps``
        request; for a pool handle, its first live instance."""
        for e in self.host._request({"op": "ps"})["enclaves"]:
            if e["handle"] == self.handle or (e.get("pool") == self.handle
                                               and e["state"] != "done"):
                return e["state"]
        return "done"

    def destroy(self) -> None:
        """Kill the enclave; its regions are freed, loans return to their lenders.

        On an enclave that has ended already this raises what ended it."""
        self.host._request({"op": "destroy", "handle": self.handle})


def resolve_eapp(eapp) -> tuple[bytes, str]:
    """Bytes and display path of an eapp given as bytes, a path, or a bundled name."""
    if isinstance(eapp, (bytes, bytearray)):
        return bytes(eapp), "<eapp>"
    p = Path(eapp)
    if not p.exists() and os.sep not in str(eapp):
        bundled = importlib.resources.files("tvmrt.eapps") / f"{p.stem}.py"
        if bundled.is_file():
            return bundled.read_bytes(), str(bundled)
    try:
        return p.read_bytes(), str(p)
    except OSError as exc:
        raise InvalidArgument(f"cannot read eapp {eapp!r}: {exc.strerror}") from None


class Host:
    """A connection to a monitor.  Close it (or use ``with``) to release everything."""

    def __init__(self, sock: socket.socket, path: str, embedded=None):
        memory.reserve_arenas()
        try:
            memory.claim_arena(os.path.realpath(path))
        except BaseException:
            sock.close()
            raise
        self.path = path
        self.table = RegionTable()
        self.chan = Channel(sock, self.table, name="monitor")
        self.embedded = embedded
        self._close_lock = threading.Lock()

    @classmethod
    def connect(cls, path: str | None = None, embedded: bool | None = None,
                verbose: bool = False, key_file: str | None = None,
                sandbox: bool = True, isolation: str = "mprotect") -> Host:
        """Connect to the monitor at ``path`` (default: :func:`default_socket_path`).

        ``embedded=None`` starts a private monitor when none answers, ``True`` always
        starts one, ``False`` never does (raises MonitorGone instead).  A private
        monitor sandboxes its enclaves unless ``sandbox=False`` (debugging); a running
        monitor's choice is its own (``tvmrt monitor --no-sandbox``).  ``isolation``
        is a private monitor's transfer mode ("mprotect" or "strict", see ``tvmrt
        monitor --isolation``); a running monitor's is its own.

        ``key_file``: start a private monitor with that key (``tvmrt monitor --key``:
        made 0600 if missing), whatever runs at ``path`` -- a running monitor has a key
        of its own.  InvalidArgument with ``embedded=False`` or ``path``, or if the
        file cannot be used.
        """
        from ._embedded import EmbeddedMonitor
        target = path or default_socket_path()
        if key_file is not None:
            if embedded is False or path is not None:
                raise InvalidArgument("key_file starts a private monitor: it takes "
                                      "neither embedded=False nor a path")
            embedded = True
        if embedded is not True:
            try:
                return cls(_dial(target), target)
            except MonitorGone:
                if embedded is False or path is not None:
                    raise
        return cls._owning(EmbeddedMonitor(verbose=verbose, key_file=key_file,
                                          sandbox=sandbox, isolation=isolation))

    @classmethod
    def _owning(cls, mon) -> Host:
        """Start the embedded monitor ``mon`` (a :class:`tvmrt._embedded.EmbeddedMonitor`
        not started yet) and connect to it; the host stops it on :meth:`close`."""
        mon.start()
        try:
            return cls(_dial(mon.path), mon.path, embedded=mon)
        except BaseException:
            mon.stop()
            raise

    @property
    def closed(self) -> bool:
        """True once this connection is closed (by close() or by the monitor)."""
        return self.chan.closed

    def _request(self, msg, fds=(), timeout=None, loan=None) -> dict:
        return self.chan.request(msg, fds, timeout=timeout, loan=loan)

    # -- memory ----------------------------------------------------------------
    def shmget(self, size: int, attach: bool = True) -> SharedMemory:
        """New shared memory of ``size`` bytes (page multiple), attached unless asked."""
        r = self._request({"op": "shmget", "size": _size(size)})
        shm = SharedMemory(self, r["id"], r["vaddr"], r["size"])
        if attach:
            shm.attach()
        return shm

    def schrodinger_get(self, size: int, attach: bool = True) -> Schrodinger:
        """New schrodinger region of ``size`` bytes (page multiple), owned by this host
        and attached unless asked."""
        r = self._request({"op": "sget", "size": _size(size)})
        reg = Schrodinger(self, r["id"], r["vaddr"], r["size"])
        if attach:
            reg.attach()
        return reg

    # -- enclaves --------------------------------------------------------------
    def create(self, eapp, name: str, type: int = NORMAL, shm=None,
               timeout: float | None = None, path: str | None = None,
               instances: int = 1, callers=None) -> Enclave:
        """Start an enclave running ``eapp`` (bytes, a path, or a bundled eapp name).

        ``shm`` is a SharedMemory (whole) or ``(SharedMemory, offset, size)``; it is
        mapped in the enclave (``args[10]``/``args[11]``, or ``args[13]``/``[14]`` for
        a server).  The enclave prints to this process's stdout/stderr.

        Returns once the eapp's module code has run; an eapp that does not compile,
        raises at import or has no ``main`` raises EnclaveFault here, with the reason.
        ``path`` names the code in tracebacks when ``eapp`` is bytes.

        ``instances`` (servers only): that many processes serve the one name; a call
        goes to an idle instance, callers queue (FIFO) when all are busy, and an
        instance that dies fails only the call it was serving.  The returned
        Enclave (its handle) stands for all of them: ``destroy()`` ends every one.

        ``callers`` (servers only): who may acquire and call it.  None (the default):
        enclaves of this host process only; ``"*"``: any enclave of the monitor; a list
        of enclave names (str) and measurements (32 bytes): those only.  To any other
        enclave the server looks exactly like one that does not exist.
        """
        if not isinstance(name, str):
            raise InvalidArgument(f"enclave name must be a str, not {name!r:.40}")
        if type not in (NORMAL, SERVER):
            raise InvalidArgument(f"enclave type must be NORMAL (0) or SERVER (1), "
                                  f"not {type!r:.40}")
        code, shown = resolve_eapp(eapp)
        path = path if isinstance(path, str) else shown   # what tracebacks name
        msg = {"op": "create", "name": name, "type": type, "code": code, "path": path}
        if timeout is not None:
            msg["timeout"] = check_seconds(timeout)
        if instances != 1:
            if not isinstance(instances, int) or isinstance(instances, bool):
                raise InvalidArgument(f"instances must be an int, not {instances!r:.40}")
            msg["instances"] = instances
        if callers is not None:
            msg["callers"] = callers if callers == "*" else list(callers)
        if shm is not None:
            if isinstance(shm, SharedMemory):
                shm = (shm, 0, shm.size)
            region, off, size = shm
            if not isinstance(region, SharedMemory):
                raise InvalidArgument("shm takes a SharedMemory region")
            msg["shm"] = [region.id, check_u64(off, "shm offset"),
                          check_u64(size, "shm size")]
        r = self._request(msg, fds=(1, 2), timeout=timeout)
        return Enclave(self, r, name, type)

    def ps(self) -> dict:
        """What the monitor holds: enclaves (each with its ``sandbox`` state), regions and
        owners, host count, the ``sandbox`` state it gives new enclaves, and its
        ``public_key`` (raw Ed25519, 32 bytes: what its reports verify with), and
        ``monitor``: the monitor process's ``pid``, ``fds``, ``rss`` (bytes), ``segments``,
        ``sockets`` and ``warm`` (warm processes ready to become enclaves) as it counts
        them itself."""
        r = self._request({"op": "ps"})
        return {"enclaves": r["enclaves"], "regions": r["regions"], "hosts": r["hosts"],
                "sandbox": r.get("sandbox"), "public_key": r["public_key"],
                "monitor": r.get("monitor")}

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Disconnect (the monitor destroys this host's enclaves and regions), unmap
        everything, and stop the embedded monitor if this host started one.

        Safe from any thread: a thread blocked in ``run()`` or another request wakes
        with ChannelClosed."""
        with self._close_lock:
            if self.chan.closed and self.embedded is None:
                return
            first = not self.chan.closed
            self.chan.close()
            if first:
                memory.release_arena()
                self.table.drop_all()
            if self.embedded is not None:
                self.embedded.stop()
                self.embedded = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"size must be an int, not {size!r:.40}")
    if not 0 < size <= U64:
        raise BadSize(f"size {size:#x} out of range")
    return size


def _dial(path: str) -> socket.socket:
    """A connected socket to the monitor at ``path``.

    Raises MonitorGone when no monitor listens there (nothing there, not a socket, a
    dead socket, a bad path) and NotPermitted when this user may not connect (another
    user's monitor); the reason is one line that says which."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise _dial_error(path, exc) from None
    wire.tune(s)
    return s


def _dial_error(path: str, exc: OSError) -> MonitorGone | NotPermitted:
    if isinstance(exc, PermissionError):
        return NotPermitted(f"may not connect to the monitor at {path}: permission denied "
                            f"(is it another user's?)")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else
                "a regular file" if stat.S_ISREG(mode) else "a special file")
        return MonitorGone(f"no monitor listening on {path} (it is {kind}, not a socket)")
    return MonitorGone(f"no monitor listening on {path} ({exc.strerror or exc})")


__all__ = ["Host", "Enclave", "SharedMemory", "Schrodinger", "NORMAL", "SERVER", "NotOwned"]
