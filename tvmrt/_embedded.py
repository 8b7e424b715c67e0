"""A private monitor in a child process, for ``tvmrt launch`` and tests."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

from ._memory import set_pdeathsig
from .errors import MonitorGone


class EmbeddedMonitor:
    """Start ``tvmrt monitor`` on a socket in a fresh 0700 directory; stop it later.

    The child gets PR_SET_PDEATHSIG(SIGTERM): it stops (and takes its enclaves with
    it) if this process dies without calling :meth:`stop`.
    """

    def __init__(self, verbose: bool = False, cpu: int | None = None):
        self.dir = None
        self.path = None
        self.proc = None
        self.verbose = verbose
        self.ready_pipe = None

    def start(self, timeout: float = 20.0) -> EmbeddedMonitor:
        self.dir = tempfile.mkdtemp(prefix="tvmrt-")
        self.path = os.path.join(self.dir, "monitor.sock")
        r, w = os.pipe()
        #: the ready pipe's identity, as /proc/PID/fd shows it (tests wait for it to close)
        self.ready_pipe = os.readlink(f"/proc/self/fd/{w}")
        # Run the very tvmrt this process imported, whatever the child's cwd or sys.path
        # would otherwise pick (e.g. a source checkout beside an installed copy).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from tvmrt.cli import main; sys.exit(main())")
        cmd = [sys.executable, "-c", boot, "monitor", "--socket", self.path,
               "--ready-fd", str(w), "--quiet"]
        if self.verbose:
            cmd.append("--verbose")
        try:
            self.proc = subprocess.Popen(
                cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                preexec_fn=lambda: set_pdeathsig(signal.SIGTERM))
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], timeout)
            ok = ready and os.read(r, 64).startswith(b"ready")
        finally:
            os.close(r)
        if not ok:
            self.stop()
            raise MonitorGone("the embedded monitor did not start")
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the monitor and wait; it destroys every enclave before exiting."""
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
