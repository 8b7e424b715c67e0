"""The enclave sandbox: what an enclave process may reach besides its own pages.

On Penglai an enclave cannot touch what the monitor did not give it; here every enclave
is a process of the user's uid, which could otherwise open ``/proc/<monitor>/fd/N``
and map the host's segments.  Each enclave process therefore, before any eapp code
runs (:func:`enter`, called by the zygote in the freshly forked child):

* is non-dumpable (``PR_SET_DUMPABLE`` 0: processes of its uid without
  ``CAP_SYS_PTRACE`` cannot open its ``/proc`` files nor ptrace it), has
  ``PR_SET_NO_NEW_PRIVS`` (no set-uid gain; required by both filters below) and holds
  no capability (a monitor run by root would otherwise give its enclaves root's);
* enters a **Landlock** domain that lets it read the Python installation (the
  prefixes, the standard library, site-packages, the tvmrt package) and the system's
  shared libraries that extension modules load, and nothing else of the filesystem:
  no ``/proc`` (not even its own), no ``/dev/shm``, no home directory, no writes, no
  ``execve``.  From Landlock ABI 6 the domain also **scopes signals and abstract Unix
  sockets**: the enclave may signal only itself and its own children;
* runs under a **seccomp** filter that fails with ``EPERM`` (never kills) the system
  calls an enclave has no use for and that reach other processes or the kernel's
  global state: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_open``,
  ``pidfd_getfd``, ``memfd_create`` without ``MFD_NOEXEC_SEAL``, namespaces
  (``unshare``, ``setns``, ``clone`` with a ``CLONE_NEW*`` flag; ``clone3`` says
  ``ENOSYS`` so that libc falls back to ``clone``), mounts, ``bpf``,
  ``perf_event_open``, keyrings, modules, kexec, ``personality``, and a few more.

Both filters are made with a handful of direct system calls through ctypes: the
Landlock and seccomp interfaces are three syscalls and one ``prctl`` with a
hand-assembled BPF program, which costs less than a runtime dependency on the
``landlock`` / ``pyseccomp`` packages (and libseccomp) that every user would install.

What the kernel offers is found once by :func:`probe`; :func:`level` names what will
be applied (``full``, or the parts that are there, or ``off``).  The zygote builds the
ruleset and the BPF program once (:func:`prepare`); each enclave only applies them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Landlock's syscalls have the same numbers on every architecture (added after 5.1's
# unified numbering): 444, 445, 446.
_NR_LANDLOCK_CREATE_RULESET = 444
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# filesystem access rights, by the ABI that introduced them
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ABI1 = (1 << 13) - 1                # EXECUTE .. MAKE_SYM
_FS_REFER = 1 << 13                     # ABI 2
_FS_TRUNCATE = 1 << 14                  # ABI 3
_FS_IOCTL_DEV = 1 << 15                 # ABI 5
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0    # ABI 6
_SCOPE_SIGNAL = 1 << 1                  # ABI 6

#: the Landlock ABI that scopes signals and abstract Unix sockets
SCOPE_ABI = 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1                          # __attribute__((packed)) in the kernel's header
    _fields_ = [("allowed_access", ctypes.c_uint64),
                ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability: the bounding set (when this process may change it:
    only with CAP_SETPCAP, i.e. as root), the ambient set, then effective, permitted
    and inheritable.  Raises OSError if the last step fails."""
    for cap in range(64):
        if _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break                   # EINVAL past the last capability; EPERM: not root
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)   # EINVAL before 4.3
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)),
                    (_CapData * 2)()) != 0:
        _fail("capset")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# ---------------------------------------------------------------------- what the kernel has
@dataclass(frozen=True)
class Support:
    """What this kernel offers: the Landlock ABI (0: none) and whether a seccomp filter
    for this architecture can be installed (``arch``: None when tvmrt has no syscall
    table for it)."""

    landlock_abi: int
    seccomp: bool
    arch: str | None


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    rc = _syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return rc if rc > 0 else 0


def probe() -> Support:
    """Read what the kernel offers (no state is changed)."""
    arch = platform.machine()
    table = arch if arch in _TABLES else None
    # PR_GET_SECCOMP answers 0 (no filter yet) or 2 when the kernel has seccomp, and
    # fails with EINVAL when it was built without it
    seccomp = _prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0
    return Support(landlock_abi(), seccomp and table is not None, table)


def level(support: Support, enabled: bool = True) -> str:
    """The sandbox state an enclave gets, as ``tvmrt ps`` shows it.

    ``off`` (``--no-sandbox``); ``full`` (Landlock with scoping and seccomp); else the
    parts that are there, joined by ``+``: ``landlock-fs`` (the filesystem rules),
    ``scoped`` (signals and abstract sockets), ``seccomp`` -- or ``basic`` when only
    non-dumpable, no-new-privs, no capabilities and the closed fds remain."""
    if not enabled:
        return "off"
    parts = []
    if support.landlock_abi >= 1:
        parts.append("landlock-fs")
    if support.landlock_abi >= SCOPE_ABI:
        parts.append("scoped")
    if support.seccomp:
        parts.append("seccomp")
    if len(parts) == 3:
        return "full"
    return "+".join(parts) or "basic"


def missing(support: Support) -> list[str]:
    """What this kernel lacks, one phrase each (empty: the sandbox is full).  A
    ``support`` without ``arch`` has no syscall table for this machine."""
    out = []
    if support.landlock_abi == 0:
        out.append("no Landlock (enclaves can read and write every file of this uid)")
    elif support.landlock_abi < SCOPE_ABI:
        out.append(f"Landlock ABI {support.landlock_abi} cannot scope signals and abstract "
                   f"Unix sockets (needs ABI {SCOPE_ABI}): enclaves can signal any process "
                   f"of this uid")
    if not support.seccomp:
        why = (f"no seccomp filter table for {platform.machine()}" if support.arch is None
               else "no seccomp in this kernel")
        out.append(f"{why} (ptrace, process_vm_readv and the rest stay allowed)")
    return out


def set_dumpable(on: bool) -> None:
    """``PR_SET_DUMPABLE``: off, processes of this uid without ``CAP_SYS_PTRACE`` can
    neither ptrace this one nor open its ``/proc/PID/{fd,mem,maps,environ}``."""
    if _prctl(PR_SET_DUMPABLE, 1 if on else 0, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_DUMPABLE)")


def dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def _fail(what: str):
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


# ---------------------------------------------------------------------- Landlock
def readable_paths() -> list[str]:
    """The directories an enclave may read below, and the files it may read.

    The Python installation (prefixes, the stdlib and site-packages directories the
    interpreter reports), the directories of the tvmrt packages (an editable install
    keeps them outside site-packages), and the system's library directories with
    ``/etc/ld.so.cache`` (extension modules imported late, e.g. ``_ssl`` or
    ``_sqlite3``, load shared libraries from there).  Not ``sys.path`` as such: its
    first entry is the current directory, which may well be the user's home."""
    import site
    import sysconfig

    import tvmrt
    cands = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            cands.append(sysconfig.get_path(name))
        except KeyError:
            pass
    try:
        cands.extend(site.getsitepackages())
    except AttributeError:
        pass
    if site.ENABLE_USER_SITE and site.USER_SITE:
        cands.append(site.USER_SITE)
    import importlib.util
    cands.extend(tvmrt.__path__)
    for name in ("tvmrt.monitor", "tvmrt.eapps"):
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            continue
        if spec is not None and spec.submodule_search_locations:
            cands.extend(spec.submodule_search_locations)
    cands += ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
              "/etc/ld.so.cache"]
    out: list[str] = []
    for p in cands:
        if p and os.path.isabs(p) and os.path.exists(p):
            p = os.path.realpath(p)
            if p not in out:
                out.append(p)
    return out


def _landlock_ruleset(abi: int, paths: list[str]) -> int:
    """A Landlock ruleset fd: every filesystem right of ``abi`` handled, read rights
    below ``paths``; signals and abstract sockets scoped from ABI 6."""
    fs = _FS_ABI1
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    if abi >= 5:
        fs |= _FS_IOCTL_DEV
    attr = _RulesetAttr(handled_access_fs=fs, handled_access_net=0,
                        scoped=(_SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX_SOCKET)
                        if abi >= SCOPE_ABI else 0)
    # the struct grew with the ABI: older kernels refuse a size they do not know
    size = 24 if abi >= SCOPE_ABI else 16 if abi >= 4 else 8
    fd = _syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                  ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        _fail("landlock_create_ruleset")
    try:
        for p in paths:
            try:
                pfd = os.open(p, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue            # vanished since readable_paths: nothing to allow
            try:
                isdir = os.path.isdir(p)
                rule = _PathBeneathAttr(
                    allowed_access=(_FS_READ_FILE | _FS_READ_DIR) if isdir else _FS_READ_FILE,
                    parent_fd=pfd)
                if _syscall(ctypes.c_long(_NR_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                            ctypes.c_uint32(0)) != 0:
                    _fail(f"landlock_add_rule({p})")
            finally:
                os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------- seccomp
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000

#: denied system calls (EPERM) by architecture; read from the kernel's uapi headers
#: (asm/unistd_64.h, asm-generic/unistd.h)
_DENY_NAMES = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "process_madvise", "process_mrelease", "move_pages", "migrate_pages",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "open_by_handle_at",
    "name_to_handle_at", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
    "request_key", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "personality", "swapon", "swapoff", "reboot", "acct", "quotactl",
    "syslog", "iopl", "ioperm",
)
_TABLES: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
        "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440,
        "process_mrelease": 448, "move_pages": 279, "migrate_pages": 256, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "kexec_file_load": 320, "personality": 135, "swapon": 167, "swapoff": 168,
        "reboot": 169, "acct": 163, "quotactl": 179, "syslog": 103, "iopl": 172,
        "ioperm": 173,
        "memfd_create": 319, "clone": 56, "clone3": 435,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440,
        "process_mrelease": 448, "move_pages": 239, "migrate_pages": 238, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "keyctl": 219, "add_key": 217, "request_key": 218, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "kexec_file_load": 294, "personality": 92, "swapon": 224, "swapoff": 225,
        "reboot": 142, "acct": 89, "quotactl": 60, "syslog": 116,
        "memfd_create": 279, "clone": 220, "clone3": 435,
    },
}
_MFD_NOEXEC_SEAL = 0x0008
#: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (CLONE_NEWTIME is
#: unshare/clone3 only)
_CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | \
    0x20000000 | 0x40000000

# classic BPF
_LD_W_ABS = 0x20
_JMP_JA, _JMP_JEQ, _JMP_JGE, _JMP_JSET = 0x05, 0x15, 0x35, 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    """Offset of the low 32 bits of syscall argument ``i`` in ``seccomp_data``
    (little-endian: both supported architectures)."""
    return 16 + 8 * i


def seccomp_program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter for ``arch`` as (code, jt, jf, k) instructions.

    The architecture is checked first (a 32-bit or x32 system call would otherwise
    slip past the numbers); the syscall number is then found by binary search over
    the handled numbers, so an allowed call -- the call path's ``sendmsg``/``recvmsg``
    -- runs about a dozen instructions."""
    table = _TABLES[arch]
    actions = {table[n]: "deny" for n in _DENY_NAMES if n in table}
    actions[table["memfd_create"]] = "memfd"
    actions[table["clone"]] = "clone"
    actions[table["clone3"]] = "enosys"
    nrs = sorted(actions)
    prog: list[list] = []       # [code, jt, jf, k] with labels (str) for jump targets
    labels: dict[str, int] = {}

    def emit(code, jt=0, jf=0, k=0):
        prog.append([code, jt, jf, k])

    emit(_LD_W_ABS, k=_OFF_ARCH)
    emit(_JMP_JEQ, 0, "deny", _AUDIT_ARCH[arch])
    emit(_LD_W_ABS, k=_OFF_NR)
    if arch == "x86_64":
        emit(_JMP_JGE, "deny", 0, _X32_BIT)
    counter = [0]

    def tree(lo: int, hi: int):
        if hi - lo <= 4:
            for nr in nrs[lo:hi]:
                emit(_JMP_JEQ, actions[nr], 0, nr)
            emit(_JMP_JA, k="allow")
            return
        mid = (lo + hi) // 2
        counter[0] += 1
        right = f"r{counter[0]}"
        emit(_JMP_JGE, right, 0, nrs[mid])
        tree(lo, mid)
        labels[right] = len(prog)
        tree(mid, hi)

    tree(0, len(nrs))
    labels["memfd"] = len(prog)
    emit(_LD_W_ABS, k=_arg_lo(1))
    emit(_JMP_JSET, "allow", "deny", _MFD_NOEXEC_SEAL)
    labels["clone"] = len(prog)
    emit(_LD_W_ABS, k=_arg_lo(0))
    emit(_JMP_JSET, "deny", "allow", _CLONE_NEW)
    labels["allow"] = len(prog)
    emit(_RET_K, k=_RET_ALLOW)
    labels["deny"] = len(prog)
    emit(_RET_K, k=_RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(prog)
    emit(_RET_K, k=_RET_ERRNO | errno.ENOSYS)
    out = []
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code == _JMP_JA:
            k = labels[k] - pc - 1 if isinstance(k, str) else k
        if isinstance(jt, str):
            jt = labels[jt] - pc - 1
        if isinstance(jf, str):
            jf = labels[jf] - pc - 1
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("seccomp program: a jump is out of range")
        out.append((code, jt, jf, k))
    return out


# ---------------------------------------------------------------------- applying it
class Prepared:
    """What the zygote builds once for every enclave it starts: the Landlock ruleset
    fd and the seccomp program.  ``close`` releases the ruleset."""

    def __init__(self, state: str, support: Support):
        self.state = state
        self.ruleset_fd: int | None = None
        self._filters = None
        self._prog = None
        if state == "off":
            return
        if support.landlock_abi >= 1:
            self.ruleset_fd = _landlock_ruleset(support.landlock_abi, readable_paths())
        if support.seccomp and support.arch is not None:
            ins = seccomp_program(support.arch)
            self._filters = (_SockFilter * len(ins))(*(_SockFilter(*i) for i in ins))
            self._prog = _SockFprog(len(ins), self._filters)

    def fds(self) -> tuple[int, ...]:
        """The fds an enclave must keep until :meth:`enter`."""
        return () if self.ruleset_fd is None else (self.ruleset_fd,)

    def enter(self) -> None:
        """In a new enclave process, before any eapp code: apply everything, or raise
        OSError (the process must then end: it never runs with less than its state)."""
        if self.state == "off":
            return
        set_dumpable(False)
        if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        drop_capabilities()
        if self.ruleset_fd is not None:
            fd, self.ruleset_fd = self.ruleset_fd, None
            try:
                if _syscall(ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                            ctypes.c_uint32(0)) != 0:
                    _fail("landlock_restrict_self")
            finally:
                os.close(fd)
        if self._prog is not None:
            if _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._prog),
                      0, 0) != 0:
                _fail("prctl(PR_SET_SECCOMP)")

    def close(self) -> None:
        if self.ruleset_fd is not None:
            os.close(self.ruleset_fd)
            self.ruleset_fd = None
