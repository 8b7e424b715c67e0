"""A hostile eapp given nothing: it tries to reach past its pages (tests/test_sandbox.py).

shm ints: [0] mode (0: every attack, then a normal call to "echo"; 1: only harmless
probes, for a monitor with --no-sandbox; 2: only the normal call), [1] monitor pid,
[2] host pid, [3] another enclave's pid, [4] the zygote's pid.
shm bytes, NUL-terminated: at 1024 a file in the user's home, at 1280 a file in
/dev/shm, at 1536 a path in /tmp to create, at 1792 an abstract socket name.
Results: ints [64 + i] for attack i: 0 it worked, an errno when refused, -1 not tried;
ATTACKS names them.  [60] the normal call's return code, [61] its resp_val.
"""
import ctypes
import errno
import os
import signal
import socket
import sys

from tvmrt import _sandbox
from tvmrt.eapp import *

ATTACKS = (
    "open /proc/monitor/fd/N", "list /proc/monitor/fd", "read /proc/host/mem",
    "read /proc/other enclave/maps", "kill the monitor", "kill another enclave",
    "kill the zygote", "ptrace attach the monitor", "process_vm_readv the host",
    "open a file in /dev/shm", "list /dev/shm", "read a file in $HOME",
    "write a file in /tmp", "pidfd_open the monitor", "kcmp", "memfd_create MFD_EXEC",
    "unshare a user namespace", "dumpable (value)", "no_new_privs (value)",
    "open fds above 2 (value)", "stdin is /dev/null (value)",
    "connect to an abstract socket outside", "exec a program",
    "effective capabilities (value)",
)
RESULTS, CALL_RC, CALL_VAL = 64, 60, 61
_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _errno_of(fn):
    try:
        fn()
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _libc_errno(rc):
    return ctypes.get_errno() if rc == -1 else 0


def _text(buf, off):
    raw = bytes(buf[off:off + 256])
    return raw[:raw.index(b"\0")].decode()


def _open_monitor_fds(mpid):
    """0 if any of the monitor's fds opened; else the first errno that is not ENOENT."""
    first = errno.ENOENT
    for n in range(64):
        try:
            fd = os.open(f"/proc/{mpid}/fd/{n}", os.O_RDONLY)
        except OSError as exc:
            if exc.errno != errno.ENOENT and first == errno.ENOENT:
                first = exc.errno
            continue
        os.close(fd)
        return 0
    return first


def _read(path):
    def go():
        with open(path, "rb") as f:
            f.read(1)
    return go


def _process_vm_readv(pid):
    buf = ctypes.create_string_buffer(16)
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), 16)
    remote = _Iovec(0x10000, 16)
    return _libc_errno(_libc.process_vm_readv(pid, ctypes.byref(local), 1,
                                              ctypes.byref(remote), 1, 0))


def _kcmp(pid):
    nr = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
    if nr is None:
        return -1
    return _libc_errno(_libc.syscall(nr, os.getpid(), pid, 0, 0, 0))   # KCMP_FILE


def _capabilities():
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.capget(hdr, data) != 0:
        return -2
    return int(bool(data[0] | data[3]))      # any effective capability (both words)


def _open_fds():
    n = 0
    for fd in range(3, 1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        n += 1
    return n


def _abstract(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(b"\0" + name.encode())
    finally:
        s.close()


def _spawn():
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], {})
    os.waitpid(pid, 0)


def main(args):
    shm = ints(args[10], args[11] // 4)
    raw = mem(args[10], args[11])
    mode, mpid, hpid, vpid, zpid = shm[0:5]
    put = {}
    if mode == 0:
        put[0] = _open_monitor_fds(mpid)
        put[1] = _errno_of(lambda: os.listdir(f"/proc/{mpid}/fd"))
        put[2] = _errno_of(_read(f"/proc/{hpid}/mem"))
        put[3] = _errno_of(_read(f"/proc/{vpid}/maps"))
        put[4] = _errno_of(lambda: os.kill(mpid, signal.SIGKILL))
        put[5] = _errno_of(lambda: os.kill(vpid, signal.SIGKILL))
        put[6] = _errno_of(lambda: os.kill(zpid, signal.SIGKILL))
        put[7] = _libc_errno(_libc.ptrace(16, mpid, None, None))      # PTRACE_ATTACH
        put[8] = _process_vm_readv(hpid)
        put[9] = _errno_of(_read(_text(raw, 1280)))
        put[10] = _errno_of(lambda: os.listdir("/dev/shm"))
        put[11] = _errno_of(_read(_text(raw, 1024)))
        put[12] = _errno_of(lambda: os.close(os.open(_text(raw, 1536),
                                                      os.O_WRONLY | os.O_CREAT, 0o600)))
        put[13] = _errno_of(lambda: os.close(os.pidfd_open(mpid)))
        put[14] = _kcmp(mpid)
        put[15] = _errno_of(lambda: os.close(os.memfd_create("x", 0x10)))   # MFD_EXEC
        put[16] = _libc_errno(_libc.unshare(0x10000000))                  # CLONE_NEWUSER
        put[21] = _errno_of(lambda: _abstract(_text(raw, 1792)))
        put[22] = _errno_of(_spawn)
    if mode == 1:
        put[1] = _errno_of(lambda: os.listdir(f"/proc/{mpid}/fd"))
        put[11] = _errno_of(_read(_text(raw, 1024)))
    if mode in (0, 1):
        put[17] = _sandbox.dumpable()
        put[18] = _libc.prctl(39, 0, 0, 0, 0)                              # NO_NEW_PRIVS
        put[19] = _open_fds()
        put[20] = int(os.fstat(0).st_rdev == os.makedev(1, 3))
        put[23] = _capabilities()
    for i, v in put.items():
        shm[RESULTS + i] = v
    if mode in (0, 2):
        a = CallArg(req_arg=41)
        shm[CALL_RC] = call_enclave(acquire_enclave("echo"), a)
        shm[CALL_VAL] = a.resp_val
    return 0
