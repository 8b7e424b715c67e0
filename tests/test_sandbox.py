"""The enclave sandbox (tvmrt._sandbox): hostile eapps are refused, others carry on.

These tests run their own embedded monitors (one sandboxed, one with --no-sandbox):
an attack that is not refused must not take the session's monitor down with it.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from conftest import eapp, private_monitor, wait_until
from tvmrt import _sandbox
from tvmrt.errors import EnclaveFault
from tvmrt.host import SERVER, Host

# the attacks and the shm layout are the hostile eapp's own (one list, not two)
_spec = importlib.util.spec_from_file_location("hostile_eapp", eapp("hostile"))
_hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hostile)
ATTACKS = _hostile.ATTACKS
RESULTS, CALL_RC, CALL_VAL = _hostile.RESULTS, _hostile.CALL_RC, _hostile.CALL_VAL
SUPPORT = _sandbox.probe()
STATE = _sandbox.level(SUPPORT)
EACCES, EPERM = errno.EACCES, errno.EPERM


def _monitor(sandbox: bool):
    yield from private_monitor(sandbox=sandbox)


@pytest.fixture(scope="module")
def sandboxed():
    yield from _monitor(True)


@pytest.fixture(scope="module")
def unsandboxed():
    yield from _monitor(False)


def _zygote(mon) -> int:
    (z,) = psutil.Process(mon.pid).children()
    return z.pid


def _pid_of(host, name) -> int:
    return next(e["pid"] for e in host.ps()["enclaves"] if e["name"] == name)


class Targets:
    """What the hostile eapp aims at: a file in $HOME, one in /dev/shm, a path in /tmp
    and an abstract socket, all of this test's, all removed by ``close``."""

    def __init__(self):
        fd, self.home = tempfile.mkstemp(dir=os.path.expanduser("~"), prefix=".tvmrt-sbtest-")
        os.write(fd, b"secret\n")
        os.close(fd)
        fd, self.devshm = tempfile.mkstemp(dir="/dev/shm", prefix="tvmrt-sbtest-")
        os.close(fd)
        self.tmp = os.path.join(tempfile.gettempdir(), f"tvmrt-sbtest-{secrets.token_hex(6)}")
        self.abstract = f"tvmrt-sbtest-{secrets.token_hex(6)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(b"\0" + self.abstract.encode())
        self.listener.listen(1)

    def close(self):
        self.listener.close()
        for p in (self.home, self.devshm, self.tmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


@pytest.fixture
def targets():
    t = Targets()
    yield t
    t.close()


def _shm_for(host, mode, mon, victim_pid, t: Targets):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    for i, x in enumerate((mode, mon.pid, os.getpid(), victim_pid, _zygote(mon))):
        v[i] = x
    for i in range(RESULTS, RESULTS + len(ATTACKS)):
        v[i] = -1
    for off, text in ((1024, t.home), (1280, t.devshm), (1536, t.tmp), (1792, t.abstract)):
        b = text.encode() + b"\0"
        shm.view[off:off + len(b)] = b
    return shm, v


def _results(v) -> dict[str, int]:
    return {name: v[RESULTS + i] for i, name in enumerate(ATTACKS)}


@pytest.mark.timeout(60)
@pytest.mark.skipif(STATE != "full", reason=f"this kernel's sandbox is {STATE!r}")
def test_hostile_eapp_is_refused_and_the_others_carry_on(sandboxed, targets):
    with Host.connect(sandboxed.path, embedded=False) as host:
        host.create(eapp("echo_server"), name="echo", type=SERVER)
        victim = _pid_of(host, "echo")
        shm, v = _shm_for(host, 0, sandboxed, victim, targets)
        enc = host.create(eapp("hostile"), name="hostile", shm=shm)
        assert enc.run() == 0
        got = _results(v)
        fs = ("open /proc/monitor/fd/N", "list /proc/monitor/fd", "read /proc/host/mem",
              "read /proc/other enclave/maps", "open a file in /dev/shm", "list /dev/shm",
              "read a file in $HOME", "write a file in /tmp", "exec a program")
        for name in fs:                                   # Landlock: no such path for it
            assert got[name] == EACCES, (name, got)
        for name in ("kill the monitor", "kill another enclave", "kill the zygote",
                     "connect to an abstract socket outside",     # Landlock's scopes
                     "ptrace attach the monitor", "process_vm_readv the host",
                     "pidfd_open the monitor", "kcmp", "memfd_create MFD_EXEC",
                     "unshare a user namespace"):                  # seccomp
            assert got[name] == EPERM, (name, got)
        assert got["dumpable (value)"] == 0
        assert got["no_new_privs (value)"] == 1
        assert got["open fds above 2 (value)"] == 1         # its channel to the monitor
        assert got["stdin is /dev/null (value)"] == 1
        assert got["effective capabilities (value)"] == 0
        # after all that, a call from the hostile enclave itself still works...
        assert (v[CALL_RC], v[CALL_VAL]) == (0, 42)
        assert not os.path.exists(targets.tmp)
        with open(targets.home, "rb") as f:
            assert f.read() == b"secret\n"
        # ...the monitor, the zygote and the other enclave live, and a new caller works
        assert sandboxed.proc.poll() is None
        assert _pid_of(host, "echo") == victim and psutil.pid_exists(victim)
        shm2, v2 = _shm_for(host, 2, sandboxed, victim, targets)
        assert host.create(eapp("hostile"), name="caller", shm=shm2).run() == 0
        assert (v2[CALL_RC], v2[CALL_VAL]) == (0, 42)


@pytest.mark.timeout(60)
def test_no_sandbox_turns_it_off(unsandboxed, targets):
    """The attacks the sandbox stops work without it: reading a file of the user's home,
    listing the monitor's fds; the enclave is dumpable, without no-new-privs."""
    with Host.connect(unsandboxed.path, embedded=False) as host:
        assert host.ps()["sandbox"] == "off"
        shm, v = _shm_for(host, 1, unsandboxed, 0, targets)
        enc = host.create(eapp("hostile"), name="probe", shm=shm)
        assert [e["sandbox"] for e in host.ps()["enclaves"]] == ["off"]
        assert enc.run() == 0
        got = _results(v)
        assert got["read a file in $HOME"] == 0
        assert got["list /proc/monitor/fd"] == 0
        assert got["dumpable (value)"] == 1
        assert got["no_new_privs (value)"] == 0
        # fds are cleaned up either way: not part of what --no-sandbox turns off
        assert got["open fds above 2 (value)"] == 1
        assert got["stdin is /dev/null (value)"] == 1


_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _inspectable(pid: int) -> int:
    """Whether a process of this uid without capabilities (root drops them: with
    CAP_SYS_PTRACE it may inspect anything) can follow ``/proc/PID/fd/0`` (the kernel
    asks ptrace_may_access, which refuses a non-dumpable process): 0 if it can, else
    the errno.  Done in a forked child, which drops its capabilities."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 255
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            data = (_CapData * 2)()
            if libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
            try:
                os.readlink(f"/proc/{pid}/fd/0")
                code = 0
            except OSError as exc:
                code = exc.errno or 254
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(child, 0)
    assert got and got[0] != 255, "the probe child could not drop its capabilities"
    return got[0]


def _drop_bounding_set():
    """In the monitor's process before exec: an empty capability bounding set, so that
    root runs it without capabilities.  Root's CAP_SYS_PTRACE would inspect anything,
    and a process holding capabilities its inspector lacks is refused whatever its
    dumpable flag: with none on either side the flag is what decides."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0:           # PR_CAPBSET_DROP
            break                                       # EINVAL past the last; EPERM


class _CaplessMonitor:
    """``tvmrt monitor`` (with or without --no-sandbox) run without capabilities."""

    def __init__(self, path: str, sandbox: bool):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tvmrt", "monitor", "--socket", path,
             *([] if sandbox else ["--no-sandbox"])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            preexec_fn=_drop_bounding_set)
        self.pid = self.proc.pid

    def __enter__(self):
        try:
            assert self.proc.stdout.readline().startswith("tvmrt monitor ")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.mark.timeout(60)
def test_monitor_zygote_and_enclaves_are_not_dumpable(tmp_path):
    for sandbox, want in ((True, EACCES), (False, 0)):
        with _CaplessMonitor(str(tmp_path / f"{sandbox}.sock"), sandbox) as mon, \
                Host.connect(mon.path, embedded=False) as host:
            host.create(eapp("echo_server"), name="echo", type=SERVER)
            for pid in (mon.pid, _zygote(mon), _pid_of(host, "echo")):
                assert _inspectable(pid) == want, (sandbox, pid)


@pytest.mark.timeout(60)
def test_ps_shows_each_enclaves_sandbox(sandboxed):
    with Host.connect(sandboxed.path, embedded=False) as host:
        host.create(eapp("echo_server"), name="echo", type=SERVER)
        r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", sandboxed.path,
                            "--json"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["sandbox"] == STATE
        assert [e["sandbox"] for e in info["enclaves"]] == [STATE]
        r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", sandboxed.path],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert f"sandbox: {STATE}" in lines[0].split("   public key")[0]
        assert lines[1].split()[-1] == "sandbox" and lines[2].split()[-1] == STATE


LATE_IMPORTS = b'''
import sys

def main(args):
    import decimal, fractions, json, sqlite3, xml.dom.minidom   # none imported before
    con = sqlite3.connect(":memory:")           # its shared library loads from /usr/lib
    total = con.execute("select 40 + 2").fetchone()[0]
    con.close()
    half = decimal.Decimal(total) / 2
    json.loads(json.dumps({"x": str(half), "y": str(fractions.Fraction(total, 4))}))
    raise ValueError("late imports work; this line shows in the traceback")
'''


@pytest.mark.timeout(60)
def test_late_imports_and_tracebacks_work_inside(sandboxed, capfd):
    with Host.connect(sandboxed.path, embedded=False) as host:
        enc = host.create(LATE_IMPORTS, name="late", path="/nowhere/late_imports.py")
        with pytest.raises(EnclaveFault, match="late imports work"):
            enc.run()
    err: list[str] = []
    assert wait_until(lambda: err.append(capfd.readouterr().err) or
                      "this line shows" in "".join(err), 10), \
        f"the traceback did not show the eapp's source line: {''.join(err)}"


@pytest.mark.timeout(60)
def test_forking_and_threads_still_work_inside(sandboxed):
    code = b'''
import os, threading
def main(args):
    t = threading.Thread(target=lambda: None); t.start(); t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status)
'''
    with Host.connect(sandboxed.path, embedded=False) as host:
        assert host.create(code, name="forker").run() == 7


@pytest.mark.timeout(60)
def test_monitor_says_what_is_off_or_missing(tmp_path):
    """--no-sandbox says at start what it turns off; a full sandbox says nothing; one
    the kernel cuts short names what is missing (one line each)."""
    for flags, expect in ((["--no-sandbox"], "--no-sandbox: "),
                          ([], None if STATE == "full" else "enclave sandbox is")):
        sock = str(tmp_path / f"m{len(flags)}.sock")
        p = subprocess.Popen([sys.executable, "-m", "tvmrt", "monitor", "--socket", sock,
                              *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline().startswith("tvmrt monitor ")   # listening
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=20)
        lines = err.splitlines()
        if expect is None:
            assert lines == []
        else:
            assert len(lines) == 1 and expect in lines[0], err
    assert "Landlock" in " ".join(_sandbox.missing(_sandbox.Support(0, False, None)))
    assert "scope" in _sandbox.missing(_sandbox.Support(5, True, "x86_64"))[0]
    assert _sandbox.level(_sandbox.Support(5, True, "x86_64")) == "landlock-fs+seccomp"
    assert _sandbox.level(_sandbox.Support(7, False, None)) == "landlock-fs+scoped"
    assert _sandbox.level(_sandbox.Support(0, False, None)) == "basic"
    assert _sandbox.level(SUPPORT, enabled=False) == "off"


def test_seccomp_program_jumps_stay_in_range():
    for arch in ("x86_64", "aarch64"):
        prog = _sandbox.seccomp_program(arch)
        assert prog[-3:] == [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x50000 | EPERM),
                             (0x06, 0, 0, 0x50000 | errno.ENOSYS)]
        for pc, (code, jt, jf, k) in enumerate(prog):
            if code & 0x07 == 0x05:                      # a jump: lands inside
                assert pc + 1 + (k if code == 0x05 else max(jt, jf)) < len(prog)
