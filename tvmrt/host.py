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
import threading
from pathlib import Path

from . import _memory as memory, _wire as wire
from .errors import BadState, InvalidArgument, MonitorGone, NotOwned, TvmError, error_for
from ._paths import default_socket_path
from ._regions import RegionTable

NORMAL = 0
SERVER = 1


class Connection:
    """Request/reply over one SOCK_SEQPACKET socket, usable from several threads.

    Each request carries an ``rid``; whichever waiting thread holds the read turn
    receives, applies grants/drops to the region table, and hands replies to their
    owners.  Raises :class:`MonitorGone` once the monitor closes the connection.
    """

    def __init__(self, sock: socket.socket, table: RegionTable):
        self.sock = sock
        self.table = table
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._reading = False
        self._next = 1
        self.gone: MonitorGone | None = None

    def request(self, msg: dict, fds=()) -> dict:
        """Send ``msg`` and wait for its reply; raise the error the monitor answered."""
        with self._cv:
            if self.gone is not None:
                raise MonitorGone(self.gone.reason)
            rid = self._next
            self._next += 1
        msg["rid"] = rid
        with self._send_lock:
            wire.send(self.sock, msg, fds)
        reply = self._wait(rid)
        if reply["op"] == "e":
            exc = error_for(reply.get("c", -1), reply.get("why", ""))
            exc.moved = "g" in reply
            raise exc
        return reply

    def _wait(self, rid: int) -> dict:
        while True:
            with self._cv:
                while True:
                    if rid in self._replies:
                        return self._replies.pop(rid)
                    if self.gone is not None:
                        raise MonitorGone(self.gone.reason)
                    if not self._reading:
                        self._reading = True
                        break
                    self._cv.wait()
            try:
                msg, fds = wire.recv(self.sock, want_fds=True)
                self.table.apply(msg, fds)
            except MonitorGone as exc:
                with self._cv:
                    self.gone = MonitorGone("the monitor closed the connection")
                    self._reading = False
                    self._cv.notify_all()
                raise MonitorGone(exc.reason) from None
            except BaseException:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()
                raise
            with self._cv:
                self._reading = False
                r = msg.get("rid")
                if isinstance(r, int):
                    self._replies[r] = msg
                self._cv.notify_all()

    def close(self):
        self.sock.close()


class _Region:
    """A region the monitor made for this host, mapped at the same address everywhere."""

    kind = ""

    def __init__(self, host: "Host", rid: int, address: int, size: int):
        self.host = host
        self.id = rid
        self.address = address
        self.size = size
        self.attached = False

    def attach(self) -> int:
        """Map the region into this process (at :attr:`address`); returns the address."""
        r = self.host._request({"op": self._ops[0], "id": self.id})
        self.attached = True
        return r["vaddr"]

    def detach(self) -> None:
        """Unmap it from this process."""
        self.host._request({"op": self._ops[1], "id": self.id})
        seg = self._seg()
        if seg is not None:
            self.host.table.drop(seg)
        self.host.table.remove_shared(self.address)
        self.attached = False

    def revoke(self) -> None:
        """Revoke the id (``shmctl`` / ``schrodinger_ctl``); BadState while attached."""
        self.host._request({"op": self._ops[2], "id": self.id})

    def remove(self) -> None:
        """Detach if attached, then revoke the id."""
        if self.attached:
            self.detach()
        self.revoke()

    def _seg(self):
        for seg, (vaddr, _) in self.host.table.mapped.items():
            if vaddr == self.address:
                return seg
        return None

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the whole region (checked: raises NotOwned if this
        process may not touch it now)."""
        return self.host.table.view(self.address, self.size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.remove()
        except MonitorGone:
            pass


class SharedMemory(_Region):
    """Plain shared memory (``shmget``): mapped by the host and any enclaves given it,
    all at once."""

    kind = "shm"
    _ops = ("shmat", "shmdt", "shmctl")

    def attach(self) -> int:
        addr = super().attach()
        self.host.table.owned.pop(self.address, None)
        self.host.table.add_shared(self.address, self.size)
        return addr


class Schrodinger(_Region):
    """A schrodinger (relay) region: the host's until an enclave runs with it, the
    enclave's during the run, the host's again after."""

    kind = "relay"
    _ops = ("sat", "sdt", "sctl")

    @property
    def owned(self) -> bool:
        """True when this process may touch it now."""
        return self.address in self.host.table.owned


class Enclave:
    """An enclave created by this host (a process started by the monitor)."""

    def __init__(self, host: "Host", reply: dict, name: str, etype: int):
        self.host = host
        self.eid = reply["eid"]
        self.handle = reply["handle"]
        self.measurement = reply["measurement"]
        self.name = name
        self.type = etype
        self.retval = None
        self._mem = None

    def set_mem_arg(self, region: Schrodinger, offset: int = 0, size: int | None = None):
        """Bind a schrodinger region (window ``offset``, ``size``) to the next run."""
        if not isinstance(region, Schrodinger):
            raise InvalidArgument("set_mem_arg takes a Schrodinger region")
        self._mem = (region, offset, region.size - offset if size is None else size)

    def run(self) -> int:
        """Run a normal enclave to its end; returns its exit value.

        The bound schrodinger region is revoked from this process for the run and is
        back (with the enclave's writes) when this returns, also on error.  Raises
        EnclaveFault (with the reason) if the eapp raised, exited or was killed.
        """
        table = self.host.table
        msg = {"op": "run", "handle": self.handle}
        revoked = None
        if self._mem is not None:
            region, off, size = self._mem
            msg["mem"] = [region.id, off, size]
            revoked = table.revoke(region.address)
        try:
            r = self.host._request(msg)
        except TvmError as exc:
            if revoked is not None and not getattr(exc, "moved", True):
                table.restore(self._mem[0].address, revoked)
            raise
        self.retval = r["retval"]
        return self.retval

    def attest(self, nonce: int) -> dict:
        """Attestation report: ``hash`` = SHA-256(measurement || nonce), ``sig`` (64 B)."""
        return self.host._request({"op": "attest", "handle": self.handle,
                                   "nonce": nonce})["report"]

    def destroy(self) -> None:
        """Kill the enclave; its regions are freed, loans return to their lenders."""
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
        self.conn = Connection(sock, self.table)
        self.embedded = embedded
        self.closed = False

    @classmethod
    def connect(cls, path: str | None = None, embedded: bool | None = None,
                verbose: bool = False) -> "Host":
        """Connect to the monitor at ``path`` (default: :func:`default_socket_path`).

        ``embedded=None`` starts a private monitor when none answers, ``True`` always
        starts one, ``False`` never does (raises MonitorGone instead).
        """
        from ._embedded import EmbeddedMonitor
        target = path or default_socket_path()
        if embedded is not True:
            try:
                return cls(_dial(target), target)
            except MonitorGone:
                if embedded is False or path is not None:
                    raise
        mon = EmbeddedMonitor(verbose=verbose).start()
        try:
            return cls(_dial(mon.path), mon.path, embedded=mon)
        except BaseException:
            mon.stop()
            raise

    def _request(self, msg, fds=()):
        if self.closed:
            raise BadState("host connection is closed")
        return self.conn.request(msg, fds)

    # -- memory ----------------------------------------------------------------
    def shmget(self, size: int, attach: bool = True) -> SharedMemory:
        """New shared memory of ``size`` bytes (page multiple), attached unless asked."""
        r = self._request({"op": "shmget", "size": size})
        shm = SharedMemory(self, r["id"], r["vaddr"], r["size"])
        if attach:
            shm.attach()
        return shm

    def schrodinger_get(self, size: int, attach: bool = True) -> Schrodinger:
        """New schrodinger region of ``size`` bytes (page multiple), owned by this host
        and attached unless asked."""
        r = self._request({"op": "sget", "size": size})
        reg = Schrodinger(self, r["id"], r["vaddr"], r["size"])
        if attach:
            reg.attach()
        return reg

    # -- enclaves --------------------------------------------------------------
    def create(self, eapp, name: str, type: int = NORMAL, shm=None) -> Enclave:
        """Start an enclave running ``eapp`` (bytes, a path, or a bundled eapp name).

        ``shm`` is a SharedMemory (whole) or ``(SharedMemory, offset, size)``; it is
        mapped in the enclave (``args[10]``/``args[11]``, or ``args[13]``/``[14]`` for
        a server).  The enclave prints to this process's stdout/stderr.
        """
        code, path = resolve_eapp(eapp)
        msg = {"op": "create", "name": name, "type": type, "code": code, "path": path}
        if shm is not None:
            if isinstance(shm, SharedMemory):
                shm = (shm, 0, shm.size)
            region, off, size = shm
            msg["shm"] = [region.id, off, size]
        r = self._request(msg, fds=(1, 2))
        return Enclave(self, r, name, type)

    def ps(self) -> dict:
        """What the monitor holds: enclaves, regions and owners, host count."""
        r = self._request({"op": "ps"})
        return {"enclaves": r["enclaves"], "regions": r["regions"], "hosts": r["hosts"]}

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Disconnect (the monitor destroys this host's enclaves and regions), unmap
        everything, and stop the embedded monitor if this host started one."""
        if self.closed:
            return
        self.closed = True
        self.conn.close()
        memory.release_arena()
        for seg in list(self.table.mapped):
            self.table.drop(seg)
        self.table.shared.clear()
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dial(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        s.close()
        raise MonitorGone(f"no monitor listening on {path} ({exc.strerror})") from None
    wire.tune(s)
    return s


__all__ = ["Host", "Enclave", "SharedMemory", "Schrodinger", "NORMAL", "SERVER", "NotOwned"]
