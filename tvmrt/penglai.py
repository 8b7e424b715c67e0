"""Penglai's host SDK names, so the tutorial's host code ports line by line.

Functions return C-style integers: 0 (or an id / address) on success and a
negative :mod:`tvmrt.errors` code on failure (-1 and -2 keep Penglai's
meaning; the other codes are distinct), after printing the reason to stderr as
Penglai's library does.  ``PLenclave_shmat`` and ``PLenclave_schrodinger_at``
return an integer address that the host reads and writes through ``ctypes``::

    shmid = PLenclave_shmget(0x4000)
    shm = PLenclave_shmat(shmid, 0)
    ctypes.c_int.from_address(shm).value = 11111

The "device" (Penglai opens ``/dev/penglai_enclave_dev``) is one connection to
the monitor per process, opened by :func:`PLenclave_init` or
:func:`open_device`: C's API has no context argument for ``shmget``, so this
layer keeps that one connection as process state; the Pythonic
:mod:`tvmrt.host` API has none.

:func:`PLenclave_init` is the one way in: with no monitor answering at the default
socket (``$TVMRT_SOCKET``, ...) it starts an embedded monitor, as
``Host.connect()`` does, says so once on stderr, and stops it when the program
ends (``atexit``; a program killed by a signal takes it along too: the monitor
gets SIGTERM through PR_SET_PDEATHSIG and removes its directory).
"""
from __future__ import annotations

import atexit
import os
import sys

from .errors import InvalidArgument, MonitorGone, TvmError, UnknownId
from .host import NORMAL, SERVER, Enclave, Host, resolve_eapp

NORMAL_ENCLAVE = NORMAL
SERVER_ENCLAVE = SERVER
SHADOW_ENCLAVE = 2
DEFAULT_STACK_SIZE = 64 * 1024
RETURN_USER_EXIT_ENCL = 0
RETURN_USER_RELAY_PAGE = 1


class elf_args:
    """``struct elf_args``: the eapp image (here: its Python source bytes)."""

    def __init__(self):
        self.filename = None
        self.path = None          # where the bytes came from (tracebacks name it)
        self.ptr = None
        self.size = 0
        self.fd = -1


class enclave_args:
    """``struct enclave_args``."""

    def __init__(self):
        self.name = ""
        self.type = NORMAL_ENCLAVE
        self.stack_size = DEFAULT_STACK_SIZE
        self.shmid = 0
        self.shm_offset = 0
        self.shm_size = 0
        #: tvmrt extension: processes serving a server's name (see Host.create)
        self.instances = 1
        #: tvmrt extension: who may call a server (None: this host process; "*": any
        #: enclave; a list of enclave names and measurements; see Host.create)
        self.callers = None


class penglai_enclave_user_param:
    """``struct penglai_enclave_user_param`` (the fields a host reads or sets)."""

    def __init__(self):
        self.eid = -1
        self.name = ""
        self.type = NORMAL_ENCLAVE
        self.stack_size = 0
        self.shmid = 0
        self.shm_offset = 0
        self.shm_size = 0
        self.schrodinger_id = 0
        self.schrodinger_offset = 0
        self.schrodinger_size = 0
        self.rerun_reason = 0
        self.retval = 0


class penglai_enclave_attest_param:
    """``enclave->attest_param``: ``eid``, ``nonce`` and, after PLenclave_attest, the
    ``report`` dict (see Enclave.attest)."""

    def __init__(self):
        self.eid = -1
        self.nonce = 0
        self.report = None


class PLenclave:
    """``struct PLenclave``."""

    def __init__(self):
        self.elffile = None
        self.eid = -1
        self.fd = -1
        self.user_param = penglai_enclave_user_param()
        self.attest_param = penglai_enclave_attest_param()
        self._enclave: Enclave | None = None


class _Device:
    """The per-process connection and the id -> region tables of the driver."""

    def __init__(self, host: Host):
        self.host = host
        self.shm = {}
        self.schrodinger = {}


_NULL = "the enclave is None or was not created"

_device: _Device | None = None   # see the module docstring


def open_device(path: str | None = None, embedded: bool | None = False) -> int:
    """Connect this process to the monitor (``path`` or the default). 0 or a code."""
    global _device
    if _device is not None and not _device.host.closed:
        return 0
    try:
        _device = _Device(Host.connect(path, embedded=embedded))
    except TvmError as exc:
        return _fail("open_device", exc)
    return 0


def close_device() -> None:
    """Close the connection: the monitor destroys what this process still holds."""
    global _device
    if _device is not None:
        _device.host.close()
        _device = None


_exit_hook = False      # close_device is registered with atexit (once)


def _open_or_embed() -> int:
    """Connect to the monitor at the default socket, else start an embedded one (one
    line on stderr says so); the device is closed -- an embedded monitor stopped, its
    directory removed -- when the program ends.  0 or a code."""
    global _device, _exit_hook
    if _device is not None and not _device.host.closed:
        return 0
    try:
        try:
            host = Host.connect(embedded=False)
        except MonitorGone as gone:
            host = Host.connect(embedded=True)
            print(f"tvmrt: {gone.reason}; started an embedded monitor at {host.path} "
                  f"(it stops when this program ends)", file=sys.stderr, flush=True)
    except TvmError as exc:
        return _fail("PLenclave_init", exc)
    _device = _Device(host)
    if not _exit_hook:
        atexit.register(close_device)
        _exit_hook = True
    return 0


def _dev() -> _Device:
    if _device is None and open_device() != 0:
        raise MonitorGone("no monitor: start `tvmrt monitor` or use tvmrt launch")
    return _device


def _fail(fn: str, exc: TvmError) -> int:
    print(f"{fn}: {exc.reason} (error {exc.code})", file=sys.stderr, flush=True)
    return exc.code


# ---------------------------------------------------------------- elf / params
def elf_args_init(elf: elf_args, filename: str) -> None:
    """Read the eapp ``filename`` (a path or a bundled eapp name) into ``elf``; a file
    that cannot be read leaves ``elf`` invalid (see elf_valid)."""
    elf.filename = filename
    try:
        elf.ptr, elf.path = resolve_eapp(filename)
        elf.size = len(elf.ptr)
        elf.fd = 0
    except TvmError as exc:
        _fail("elf_args_init", exc)
        elf.ptr, elf.size, elf.fd = None, 0, -1


def elf_valid(elf: elf_args) -> int:
    """1 if ``elf`` holds eapp code (elf_args_init succeeded), else 0."""
    return 1 if (elf.fd >= 0 and elf.size > 0 and elf.ptr is not None) else 0


def elf_args_destroy(elf: elf_args) -> None:
    """Forget the code ``elf`` holds."""
    elf.ptr, elf.size, elf.fd = None, 0, -1


def enclave_args_init(args: enclave_args) -> None:
    """Defaults as in Penglai (the name is left for the caller to set)."""
    args.type = NORMAL_ENCLAVE
    args.stack_size = DEFAULT_STACK_SIZE
    args.shmid = args.shm_offset = args.shm_size = 0


# ---------------------------------------------------------------- lifecycle
def PLenclave_init(enclave: PLenclave) -> int:
    """Reset ``enclave`` and connect to the monitor (the device, on Penglai): the one at
    the default socket, or -- none answering -- an embedded one started for this
    program (said once on stderr, stopped at exit).  0, or -1 with the reason printed."""
    if enclave is None:
        return _fail("PLenclave_init", InvalidArgument(_NULL))
    enclave.__init__()
    rc = _open_or_embed()
    if rc == 0:
        # the device fd: the connection's socket (shared by every PLenclave here)
        enclave.fd = _device.host.chan.sock.fileno() if _device is not None else 1
    return rc


def PLenclave_create(enclave: PLenclave, elffile: elf_args, args: enclave_args) -> int:
    """Create an enclave of ``elffile`` as ``args`` say (name, type, shm window,
    ``instances``, ``callers``) bound to ``enclave`` (after PLenclave_init); 0, or -1
    with the reason printed (Penglai style)."""
    if enclave is None or enclave.fd < 0 or not elf_valid(elffile):
        return _fail("PLenclave_create", InvalidArgument("bad enclave or elf arguments"))
    dev = _dev()
    shm = None
    if args.shmid:
        region = dev.shm.get(args.shmid)
        if region is None:
            return _fail("PLenclave_create", UnknownId(f"no shm id {args.shmid:#x}"))
        shm = (region, args.shm_offset, args.shm_size)
    try:
        enc = dev.host.create(elffile.ptr, name=args.name, type=args.type, shm=shm,
                              path=getattr(elffile, "path", None) or elffile.filename,
                              instances=getattr(args, "instances", 1),
                              callers=getattr(args, "callers", None))
    except TvmError as exc:
        return _fail("PLenclave_create", exc)
    enclave.elffile = elffile
    enclave._enclave = enc
    enclave.eid = enc.eid
    up = enclave.user_param
    up.eid, up.name, up.type = enc.eid, args.name, args.type
    up.stack_size = args.stack_size
    up.shmid, up.shm_offset, up.shm_size = args.shmid, args.shm_offset, args.shm_size
    return 0


def PLenclave_set_mem_arg(enclave: PLenclave, mm_arg_id: int, mm_arg_offset: int,
                          mm_arg_size: int) -> int:
    """Lend schrodinger region ``mm_arg_id`` (window ``mm_arg_offset``,
    ``mm_arg_size``) to the enclave for its next run (``args[13]``/``[14]``); 0 or -1."""
    if enclave is None:
        return _fail("PLenclave_set_mem_arg", InvalidArgument(_NULL))
    up = enclave.user_param
    up.schrodinger_id, up.schrodinger_offset, up.schrodinger_size = (
        mm_arg_id, mm_arg_offset, mm_arg_size)
    return 0


def PLenclave_run(enclave: PLenclave) -> int:
    """Run to the end: 0, with the exit value in ``enclave.user_param.retval``; or 1
    (RETURN_USER_RELAY_PAGE) when the eapp called ``eapp_return_relay_page``: the relay
    page is the host's until ``PLenclave_set_rerun_arg(enclave, 1)`` and the next
    ``PLenclave_run`` continue the enclave (``retval`` untouched); or -1."""
    if enclave is None or enclave._enclave is None:
        return _fail("PLenclave_run", InvalidArgument("enclave was not created"))
    dev = _dev()
    up = enclave.user_param
    enc = enclave._enclave
    if up.schrodinger_id:
        region = dev.schrodinger.get(up.schrodinger_id)
        if region is None:
            return _fail("PLenclave_run",
                         UnknownId(f"no schrodinger id {up.schrodinger_id:#x}"))
        enc.set_mem_arg(region, up.schrodinger_offset, up.schrodinger_size)
    sys.stdout.flush()
    try:
        enc.set_rerun_arg(up.rerun_reason)
        rv = enc.run()
    except TvmError as exc:
        return _fail("PLenclave_run", exc)
    if enc.relay_returned:
        return RETURN_USER_RELAY_PAGE       # eapp_return_relay_page; retval unchanged
    up.retval = rv
    return RETURN_USER_EXIT_ENCL


def PLenclave_set_rerun_arg(enclave: PLenclave, reason: int) -> int:
    """Penglai's setter: the next PLenclave_run continues an enclave whose run
    returned 1 (eapp_return_relay_page) when ``reason`` is 1 (RETURN_USER_RELAY_PAGE,
    the only accepted reason: another makes that run fail).  Not cleared by the run,
    as on Penglai.  -1 only for a None enclave."""
    if enclave is None:
        return _fail("PLenclave_set_rerun_arg", InvalidArgument(_NULL))
    enclave.user_param.rerun_reason = reason
    return 0


def PLenclave_attest(enclave: PLenclave, nonce: int) -> int:
    """Attest ``enclave`` with ``nonce``: 0, and the report in
    ``enclave.attest_param.report``, or the negative code.  The report is the dict of
    :meth:`tvmrt.host.Enclave.attest` (``sig`` is a 64-byte Ed25519 signature, like
    Penglai's 64-byte SM2 one, that :func:`tvmrt.verify_report` checks with
    ``public_key``), not Penglai's 328-byte struct."""
    if enclave is None or enclave._enclave is None:
        return _fail("PLenclave_attest", InvalidArgument(_NULL))
    try:
        enclave.attest_param.report = enclave._enclave.attest(nonce)
    except TvmError as exc:
        return _fail("PLenclave_attest", exc)
    enclave.attest_param.nonce = nonce
    enclave.attest_param.eid = enclave.eid
    return 0


def _on_enclave(what: str, enclave: PLenclave, act) -> int:
    """Penglai's convention for an operation on a created enclave: ``act(enc)`` on its
    tvmrt Enclave; 0, or ``_fail`` with the TvmError raised (or the NULL argument)."""
    if enclave is None or enclave._enclave is None:
        return _fail(what, InvalidArgument(_NULL))
    try:
        act(enclave._enclave)
    except TvmError as exc:
        return _fail(what, exc)
    return 0


def PLenclave_stop(enclave: PLenclave) -> int:
    """Stop the enclave's process -- and, while it waits in ``call_enclave``, the
    servers running its call chain (see :meth:`tvmrt.host.Enclave.stop`).  0 or a
    negative code (Stopped -61 if stopped already)."""
    return _on_enclave("PLenclave_stop", enclave, lambda e: e.stop())


def PLenclave_resume(enclave: PLenclave) -> int:
    """Continue what :func:`PLenclave_stop` stopped.  0 or a negative code (NotStopped
    -60 if it is not stopped).  The thread blocked in ``PLenclave_run`` just goes on
    waiting: nothing to re-enter, unlike Penglai's driver."""
    return _on_enclave("PLenclave_resume", enclave, lambda e: e.resume())


def PLenclave_destroy(enclave: PLenclave) -> int:
    """Destroy the enclave (every instance of a server); its regions are freed and loans
    go back.  0 or -1."""
    return _on_enclave("PLenclave_destroy", enclave, lambda e: e.destroy())


def PLenclave_destruct(enclave: PLenclave) -> None:
    """Penglai only closes the device fd here; nothing is destroyed."""
    if enclave is not None:
        enclave.fd = -1


# ---------------------------------------------------------------- shared memory
def _region_call(fn, table, rid, action):
    try:
        region = getattr(_dev(), table).get(rid)
        if region is None:
            raise UnknownId(f"unknown id {rid:#x}" if isinstance(rid, int) else "bad id")
        return action(region)
    except TvmError as exc:
        return _fail(fn, exc)


def PLenclave_shmget(size: int) -> int:
    """New shared memory; returns its id (>= 0x10000) or a negative code."""
    try:
        region = _dev().host.shmget(size, attach=False)
    except TvmError as exc:
        return _fail("PLenclave_shmget", exc)
    _dev().shm[region.id] = region
    return region.id


def PLenclave_shmat(shmid: int, addr: int = 0) -> int:
    """Map it here; returns its address (the same in every process) or a code."""
    return _region_call("PLenclave_shmat", "shm", shmid, lambda r: r.attach())


def PLenclave_shmdt(shmid: int, addr: int = 0) -> int:
    """Unmap shared memory ``shmid`` from this host (it lives on while mapped); 0 or -1."""
    return _region_call("PLenclave_shmdt", "shm", shmid, lambda r: r.detach() or 0)


def PLenclave_shmctl(shmid: int) -> int:
    """Revoke the id.  Unlike Penglai's library, the result is real."""
    def ctl(r):
        r.revoke()
        del _dev().shm[shmid]
        return 0
    return _region_call("PLenclave_shmctl", "shm", shmid, ctl)


def PLenclave_schrodinger_get(size: int) -> int:
    """A new schrodinger region of ``size`` bytes (page multiple); its id, or -1."""
    try:
        region = _dev().host.schrodinger_get(size, attach=False)
    except TvmError as exc:
        return _fail("PLenclave_schrodinger_get", exc)
    _dev().schrodinger[region.id] = region
    return region.id


def PLenclave_schrodinger_at(id: int, addr: int = 0) -> int:
    """Map schrodinger region ``id`` in this host; its address, or -1."""
    return _region_call("PLenclave_schrodinger_at", "schrodinger", id, lambda r: r.attach())


def PLenclave_schrodinger_dt(id: int, addr: int = 0) -> int:
    """Unmap schrodinger region ``id`` from this host; 0 or -1."""
    return _region_call("PLenclave_schrodinger_dt", "schrodinger", id,
                        lambda r: r.detach() or 0)


def PLenclave_schrodinger_ctl(id: int) -> int:
    """Remove schrodinger region ``id`` (freed once nobody holds it); 0 or -1."""
    def ctl(r):
        r.revoke()
        del _dev().schrodinger[id]
        return 0
    return _region_call("PLenclave_schrodinger_ctl", "schrodinger", id, ctl)


__all__ = [n for n in dir() if n.startswith(("PLenclave", "elf_", "enclave_args",
                                              "penglai_", "NORMAL", "SERVER", "SHADOW"))]
__all__ += ["elf_args", "enclave_args", "open_device", "close_device",
            "RETURN_USER_EXIT_ENCL", "DEFAULT_STACK_SIZE"]
del os
