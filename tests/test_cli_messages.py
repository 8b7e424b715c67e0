"""Every failure of the ``tvmrt`` command is one line on stderr that says what is wrong,
never a traceback, and a non-zero exit."""
from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import sys

import psutil
import pytest

from conftest import eapp, wait_until
from tvmrt import cli, host as host_mod

pytestmark = pytest.mark.timeout(60)


def _env(tmp_path):
    """A private TMPDIR (to see what is left there) and no monitor on the default socket."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["TVMRT_SOCKET"] = str(tmp_path / "none.sock")
    return env


def _tvmrt(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "tvmrt", *args], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=60)


def _one_line(r, prefix: str) -> str:
    """The one stderr line of a failed command, checked: non-zero exit, the prefix, no
    traceback anywhere."""
    assert r.returncode not in (0, None), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# ---------------------------------------------------------------- tvmrt ps
def test_ps_on_a_directory_says_it_is_not_a_socket(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    line = _one_line(_tvmrt(tmp_path, "ps", "--socket", str(d)), "tvmrt ps: ")
    assert line == f"tvmrt ps: no monitor listening on {d} (it is a directory, not a socket)"


def test_ps_on_a_regular_file_says_it_is_not_a_socket(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    line = _one_line(_tvmrt(tmp_path, "ps", "--socket", str(f)), "tvmrt ps: ")
    assert "(it is a regular file, not a socket)" in line


def test_ps_below_a_file_says_so(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    line = _one_line(_tvmrt(tmp_path, "ps", "--socket", str(f / "m.sock")), "tvmrt ps: ")
    assert line == f"tvmrt ps: no monitor listening on {f / 'm.sock'} (Not a directory)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_ps_on_another_users_monitor_says_permission_denied(tmp_path):
    d = tmp_path / "private"
    d.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(d / "m.sock"))
    s.listen(1)
    os.chmod(d, 0)
    try:
        line = _one_line(_tvmrt(tmp_path, "ps", "--socket", str(d / "m.sock")),
                         "tvmrt ps: ")
    finally:
        os.chmod(d, stat.S_IRWXU)
        s.close()
    assert "permission denied" in line


def test_ps_permission_denied_is_one_line(tmp_path, monkeypatch, capsys):
    """The same as the test above, for root too: connect fails as it does for another
    user's socket."""
    class Refused(socket.socket):
        def connect(self, address):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(host_mod.socket, "socket", Refused)
    path = str(tmp_path / "theirs.sock")
    assert cli.main(["ps", "--socket", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"tvmrt ps: may not connect to the monitor at {path}: permission "
                   f"denied (is it another user's?)\n")


# ---------------------------------------------------------------- tvmrt launch: its files
def test_launch_empty_file(tmp_path):
    line = _one_line(_tvmrt(tmp_path, "launch", "/dev/null"), "tvmrt launch: ")
    assert line == ("tvmrt launch: eapp '/dev/null' is empty: an eapp is a Python file "
                    "that defines main(args)")
    assert os.listdir(tmp_path / "tmp") == []      # refused before any monitor started


def test_launch_binary_file(tmp_path):
    b = tmp_path / "prog"
    b.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    line = _one_line(_tvmrt(tmp_path, "launch", str(b)), "tvmrt launch: ")
    assert line == f"tvmrt launch: eapp {str(b)!r} is a binary file, not Python source"


def test_launch_binary_file_without_nul(tmp_path):
    b = tmp_path / "latin"
    b.write_bytes(b"\xff\xfe\xfa junk")
    line = _one_line(_tvmrt(tmp_path, "launch", str(b)), "tvmrt launch: ")
    assert "is not valid Python: (unicode error)" in line


def test_launch_file_that_does_not_compile(tmp_path):
    r = _tvmrt(tmp_path, "launch", "caller", eapp("syntax_error"))
    line = _one_line(r, "tvmrt launch: ")
    assert line == (f"tvmrt launch: eapp {eapp('syntax_error')!r} is not valid Python: "
                    f"expected ':' (line 1)")
    assert r.stdout == ""


def test_launch_directory_and_missing_file(tmp_path):
    line = _one_line(_tvmrt(tmp_path, "launch", str(tmp_path)), "tvmrt launch: ")
    assert line == f"tvmrt launch: cannot read eapp {str(tmp_path)!r}: Is a directory"
    line = _one_line(_tvmrt(tmp_path, "launch", "no_such_eapp"), "tvmrt launch: ")
    assert line == "tvmrt launch: cannot read eapp 'no_such_eapp': No such file or directory"


def test_launch_too_many_eapps(tmp_path):
    r = _tvmrt(tmp_path, "launch", "caller", "server", "server1", "hello_world")
    _one_line(r, "tvmrt launch: at most three eapps")
    assert r.returncode == 2


def test_launch_without_monitor_at_socket(tmp_path):
    sock = tmp_path / "nobody.sock"
    line = _one_line(_tvmrt(tmp_path, "launch", "--socket", str(sock), "hello_world"),
                     "tvmrt launch: ")
    assert line == f"tvmrt launch: no monitor listening on {sock} (No such file or directory)"


# ---------------------------------------------------------------- tvmrt launch: monitor lost
SLEEPER = """\
import time
from tvmrt.eapp import *


def main(args):
    eapp_print("sleeper: running\\n")
    time.sleep(60)
    return 0
"""


def test_launch_monitor_killed_says_so_in_one_line(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)
    env = _env(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "tvmrt", "launch", str(sleeper)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the enclave sleeps (it runs no eapp code that could print when it is killed)
        assert p.stdout.readline() == "sleeper: running\n"
        (mon,) = [k for k in psutil.Process(p.pid).children()
                  if "monitor" in k.cmdline()]
        mon.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1
    assert err == "tvmrt launch: the monitor went away\n"
    assert out == ""
    assert wait_until(lambda: os.listdir(env["TMPDIR"]) == [], 10)
