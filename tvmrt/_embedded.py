"""A private monitor in a child process, for ``tvmrt launch`` and tests.

Its socket lives in a fresh 0700 directory ``$TMPDIR/tvmrt-<pid>-XXXXXXXX`` (``pid``:
the process that started it), and that directory goes away however the host ends:

* :meth:`EmbeddedMonitor.stop` removes it;
* the monitor removes it itself when it exits (``tvmrt monitor --own-socket-dir``), so
  a host that dies without stopping it (a signal, even SIGKILL: the monitor then gets
  SIGTERM by PR_SET_PDEATHSIG and shuts down cleanly) leaves nothing either;
* when nobody could (the monitor was SIGKILLed, and its host died too), the next
  :meth:`EmbeddedMonitor.start` of the same user removes it: see :func:`sweep_stale_dirs`.
"""
from __future__ import annotations

import errno
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from ._memory import set_pdeathsig
from .errors import MonitorGone

#: the socket's name in its directory
SOCKET_NAME = "monitor.sock"
#: ``tvmrt-<pid of the starter>-<mkdtemp's 8 random characters>``
_DIR_RE = re.compile(r"tvmrt-([0-9]+)-[a-z0-9_]{8}\Z")
#: what versions before the pid was in the name made: ``tvmrt-<8 random characters>``
_OLD_DIR_RE = re.compile(r"tvmrt-[a-z0-9_]{8}\Z")
#: an old-style directory (no pid to ask) is stale only when it is older than this:
#: a host of an older version may be starting its monitor in it right now
_OLD_DIR_GRACE = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                       # someone else's process
    except (OverflowError, ValueError):
        return False                      # not a pid at all
    return True


def _answers(path: str) -> bool:
    """False only if nothing listens on ``path`` (refused); True if something accepts
    or is too busy to, and when in doubt."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.setblocking(False)
        rc = s.connect_ex(path)
    except OSError:
        return True                       # e.g. a path too long to connect to
    finally:
        s.close()
    return rc != errno.ECONNREFUSED


def _is_stale(path: str, old_style: bool, now: float) -> bool:
    """A monitor directory nobody will clean: empty or holding only a dead socket."""
    try:
        st = os.lstat(path)
        names = os.listdir(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False                      # not ours: never touched
    if old_style and now - st.st_mtime < _OLD_DIR_GRACE:
        return False
    if not names:
        return True
    if names != [SOCKET_NAME]:
        return False                      # something we did not put there: left alone
    sock = os.path.join(path, SOCKET_NAME)
    try:
        is_sock = stat.S_ISSOCK(os.lstat(sock).st_mode)
    except OSError:
        return False
    return is_sock and not _answers(sock)


def sweep_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove the embedded-monitor directories in ``tmp`` (default: the temp dir) that a
    crash left behind; returns the paths removed.

    A directory is removed only when it is this user's, its name is one
    :class:`EmbeddedMonitor` makes, the process that made it is gone (for names without
    a pid: it is a minute old), and it is empty or holds only a socket that no monitor
    answers on.  Anything else in it, or a monitor still answering, keeps it.  Safe to
    run concurrently: each removal is a single unlink/rmdir that fails harmlessly.
    """
    tmp = tmp or tempfile.gettempdir()
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith("tvmrt-"):
            continue
        m = _DIR_RE.match(name)
        if m:
            if _pid_alive(int(m.group(1))):
                continue
            old_style = False
        elif _OLD_DIR_RE.match(name) and not name[6:].isdigit():
            old_style = True              # all digits would be tvmrt-$UID: not ours
        else:
            continue
        path = entry.path
        if not _is_stale(path, old_style, now):
            continue
        try:
            if os.listdir(path):
                os.unlink(os.path.join(path, SOCKET_NAME))
            os.rmdir(path)
        except OSError:
            continue                      # another sweeper, or it came alive
        removed.append(path)
    return removed


class EmbeddedMonitor:
    """Start ``tvmrt monitor`` on a socket in a fresh 0700 directory; stop it later.

    The child gets PR_SET_PDEATHSIG(SIGTERM): it stops (and takes its enclaves with
    it) if this process dies without calling :meth:`stop`, and then removes its socket
    directory itself.  It runs in a session of its own: the terminal's signals (^C,
    hang-up) reach this process, which stops it, never the monitor behind its back.
    """

    def __init__(self, verbose: bool = False, cpu: int | None = None,
                 key_file: str | None = None, sandbox: bool = True,
                 isolation: str = "mprotect", prelude: str = ""):
        #: the monitor's key file (``tvmrt monitor --key``), or None: a fresh key
        self.key_file = None if key_file is None else os.path.abspath(key_file)
        self.dir = None
        self.path = None
        self.proc = None
        self.verbose = verbose
        #: False: ``--no-sandbox`` (debugging: enclaves unsandboxed, the monitor dumpable)
        self.sandbox = sandbox
        #: the transfer mode (``tvmrt monitor --isolation``): "mprotect" or "strict"
        self.isolation = isolation
        self.ready_pipe = None
        #: Python run in the monitor process before ``tvmrt monitor`` starts: for the
        #: measuring tools and tests that change or watch the monitor (an audit hook,
        #: a stub core), never set by tvmrt itself
        self.prelude = prelude

    def start(self, timeout: float = 20.0) -> EmbeddedMonitor:
        """Start the monitor and wait until it listens; MonitorGone if it does not.

        First removes the directories earlier embedded monitors could not (see
        :func:`sweep_stale_dirs`).  Whatever interrupts the start (a timeout, a signal
        turned into an exception) stops the child and removes the directory.  A key
        file the monitor could not use is refused here, before any child starts
        (InvalidArgument with the monitor's one line); a missing one is made."""
        if self.key_file is not None:
            from .monitor.keyfile import load_or_create_key
            load_or_create_key(self.key_file)
        sweep_stale_dirs()
        try:
            self.dir = tempfile.mkdtemp(prefix=f"tvmrt-{os.getpid()}-")
        except OSError as exc:
            raise MonitorGone(f"cannot make a directory for the embedded monitor: "
                              f"{exc.strerror or exc}") from None
        self.path = os.path.join(self.dir, SOCKET_NAME)
        try:
            self._spawn(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, timeout: float) -> None:
        r, w = os.pipe()
        #: the ready pipe's identity, as /proc/PID/fd shows it (tests wait for it to close)
        self.ready_pipe = os.readlink(f"/proc/self/fd/{w}")
        # Run the very tvmrt this process imported, whatever the child's cwd or sys.path
        # would otherwise pick (e.g. a source checkout beside an installed copy).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (f"import sys; sys.path.insert(0, {root!r})\n{self.prelude}\n"
                f"from tvmrt.cli import main; sys.exit(main())")
        cmd = [sys.executable, "-c", boot, "monitor", "--socket", self.path,
               "--ready-fd", str(w), "--quiet", "--own-socket-dir"]
        if self.verbose:
            cmd.append("--verbose")
        if self.key_file is not None:
            cmd += ["--key", self.key_file]
        if not self.sandbox:
            cmd.append("--no-sandbox")
        if self.isolation != "mprotect":
            cmd += ["--isolation", self.isolation]
        parent = os.getpid()

        def in_child():
            # SIGTERM stays blocked until the monitor's cli has its handler in place
            # (cli._monitor): one that comes sooner (we die while it starts) waits, and
            # then ends it cleanly, directory removed, instead of killing it outright.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            set_pdeathsig(signal.SIGTERM)
            if os.getppid() != parent:    # we died before the line above took effect
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=in_child)
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], timeout)
            ok = ready and os.read(r, 64).startswith(b"ready")
        finally:
            os.close(r)
        if not ok:
            raise MonitorGone("the embedded monitor did not start")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the monitor and wait; it destroys every enclave before exiting.
        Then the socket directory is removed (the monitor usually did already)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
