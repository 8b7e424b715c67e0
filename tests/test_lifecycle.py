"""Stop, resume and destroy with real processes (issue 9, lifecycle), and Penglai code's
one way in: ``PLenclave_init`` starts an embedded monitor when none runs.

A stop is SIGSTOP to the enclave's process group (the state letter in /proc/PID/stat is
``T``); while the enclave waits in ``call_enclave`` the servers running its chain are
stopped with it; deadlines run on; destroying a stopped enclave leaves nothing behind.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import eapp, shm_names, wait_until
from tvmrt import SERVER, penglai as P
from tvmrt.errors import NotStopped, PeerDied, Stopped, Timeout, TvmError

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
LOOP = str(ROOT / "eapps" / "loop.py")


def proc_state(pid: int) -> str:
    """The state letter of process ``pid`` (R, S, T, Z, ...) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return chr(stat[stat.rindex(b")") + 2])


def entry(host, enc) -> dict:
    return next(e for e in host.ps()["enclaves"] if e["handle"] == enc.handle)


class Runner:
    """``enc.run()`` in a thread (joined by the test); its result or exception."""

    def __init__(self, enc, timeout=None):
        self.result: object = None
        self.thread = threading.Thread(target=self._run, args=(enc, timeout), daemon=True)
        self.thread.start()

    def _run(self, enc, timeout):
        try:
            self.result = enc.run(timeout=timeout)
        except TvmError as exc:
            self.result = exc

    def join(self, timeout=10):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        return self.result


def counter(shm):
    return shm.view.cast("i")[0]


def advances(shm, wait=0.3) -> bool:
    before = counter(shm)
    return wait_until(lambda: counter(shm) > before, wait * 10) and counter(shm) > before


def frozen(shm, wait=0.3) -> bool:
    before = counter(shm)
    time.sleep(wait)
    return counter(shm) == before


def test_stop_freezes_the_process_and_resume_continues_it(host):
    """Penglai's test-stop: run loop, stop (counter frozen, state T), resume (counter
    moves), destroy (the run ends, the process is gone)."""
    shm = host.shmget(0x4000)
    enc = host.create(LOOP, name="loop", shm=shm)
    run = Runner(enc)
    assert wait_until(lambda: counter(shm) > 0)
    assert enc.state == "running"
    pid = entry(host, enc)["pid"]

    assert enc.stop() == [enc.handle]
    assert wait_until(lambda: proc_state(pid) == "T", 5)
    assert enc.state == "stopped"
    assert entry(host, enc)["was"] == "running"
    assert frozen(shm)
    with pytest.raises(Stopped):
        enc.stop()

    assert enc.resume() == [enc.handle]
    assert advances(shm)
    assert proc_state(pid) != "T"
    assert enc.state == "running"
    with pytest.raises(NotStopped):
        enc.resume()

    enc.stop()
    assert wait_until(lambda: proc_state(pid) == "T", 5)
    enc.destroy()                                  # a stopped process is killed too
    assert isinstance(run.join(), TvmError)
    assert wait_until(lambda: not psutil.pid_exists(pid)
                      or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
    with pytest.raises(TvmError):
        enc.resume()                               # an ended enclave: what ended it
    assert enc.state == "done"
    shm.remove()


def test_resume_or_run_in_the_wrong_state_is_a_clear_error(host):
    enc = host.create(LOOP, name="loop-idle")
    with pytest.raises(NotStopped, match="not stopped"):
        enc.resume()                                # created, never stopped
    enc.stop()                                      # a created enclave may be stopped
    assert enc.state == "stopped"
    with pytest.raises(Stopped, match="resume it first"):
        enc.run(timeout=1)
    enc.resume()
    assert enc.state == "created"
    enc.destroy()


def test_deadlines_run_on_while_stopped(host):
    shm = host.shmget(0x1000)
    enc = host.create(LOOP, name="loop-deadline", shm=shm)
    run = Runner(enc, timeout=1.0)
    assert wait_until(lambda: counter(shm) > 0)
    enc.stop()
    res = run.join()
    assert isinstance(res, Timeout) and "stopped" in res.reason
    assert enc.state == "stopped"                   # the timeout does not resume it
    enc.destroy()
    shm.remove()


def _chain(host):
    """A caller waiting in call_enclave on loop-server, which counts in its shm."""
    sshm = host.shmget(0x1000)
    cshm = host.shmget(0x1000)
    srv = host.create(eapp("loop_server"), name="loop-server", type=SERVER, shm=sshm)
    caller = host.create(eapp("loop_caller"), name="loop-caller", shm=cshm)
    run = Runner(caller)
    assert wait_until(lambda: counter(sshm) > 0)
    assert cshm.view.cast("i")[1] == 1
    return srv, caller, run, sshm, cshm


def test_stop_during_a_nested_call_stops_the_running_server(host):
    srv, caller, run, sshm, cshm = _chain(host)
    spid, cpid = entry(host, srv)["pid"], entry(host, caller)["pid"]
    assert caller.state == "running" and srv.state == "serving"

    assert caller.stop() == [caller.handle, srv.handle]
    assert wait_until(lambda: proc_state(spid) == "T" and proc_state(cpid) == "T", 5)
    assert frozen(sshm)                             # the server is what was running
    e = entry(host, srv)
    assert e["state"] == "stopped" and e["was"] == "serving"
    assert e["stopped_by"] == caller.handle
    out = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path],
                         capture_output=True, text=True, timeout=30).stdout
    for name in ("loop-server", "loop-caller"):
        line = next(ln for ln in out.splitlines() if name in ln)
        assert " stopped " in line, out
    with pytest.raises(NotStopped, match="resume that one"):
        srv.resume()                                # the chain resumes as one
    with pytest.raises(Stopped):
        srv.stop()

    caller.resume()
    assert advances(sshm)
    assert proc_state(spid) != "T" and proc_state(cpid) != "T"
    assert srv.state == "serving"

    # destroy the stopped server: the caller's loan comes back to it (the right
    # lender) with what the server wrote, and its call fails with PeerDied
    caller.stop()
    srv.destroy()
    region = next(r for r in host.ps()["regions"] if r["kind"] == "relay")
    assert region["owner"] == entry(host, caller)["peer"] and region["lenders"] == []
    assert caller.state == "stopped"
    caller.resume()
    assert run.join() == 0
    got = cshm.view.cast("i")
    assert got[2] == PeerDied.code and got[3] == 7
    for s in (sshm, cshm):
        s.remove()


def test_destroying_a_stopped_caller_lets_its_server_go_on(host):
    srv, caller, run, sshm, cshm = _chain(host)
    spid = entry(host, srv)["pid"]
    caller.stop()
    assert wait_until(lambda: proc_state(spid) == "T", 5)
    caller.destroy()
    assert isinstance(run.join(), TvmError)
    # nobody can resume the chain any more: the server goes on with the call (DESIGN §4:
    # what it returns is freed); the loan is the server's until then
    assert wait_until(lambda: proc_state(spid) != "T", 5)
    assert advances(sshm)
    e = entry(host, srv)
    assert e["state"] == "serving" and e["stopped_by"] is None
    region = next(r for r in host.ps()["regions"] if r["kind"] == "relay")
    assert region["owner"] == e["peer"]
    srv.destroy()                                   # the dead caller's loan is freed
    assert wait_until(lambda: not [r for r in host.ps()["regions"] if r["kind"] == "relay"])
    for s in (sshm, cshm):
        s.remove()


def test_a_stopped_server_takes_no_call_and_its_caller_times_out(host):
    """An idle server that is stopped is not idle for dispatch: a call to it queues and
    fails with Timeout at the queue deadline; resumed, it serves again."""
    sshm = host.shmget(0x1000)
    cshm = host.shmget(0x1000)
    srv = host.create(eapp("loop_server"), name="loop-server", type=SERVER, shm=sshm)
    srv.stop()
    assert srv.state == "stopped" and entry(host, srv)["was"] == "idle"
    caller = host.create(eapp("loop_caller"), name="loop-caller", shm=cshm)
    run = Runner(caller)
    assert wait_until(lambda: cshm.view.cast("i")[1] == 1)
    assert frozen(sshm)
    assert srv.state == "stopped"
    srv.resume()                                    # now it takes the queued call
    assert advances(sshm)
    assert srv.state == "serving"
    caller.destroy()
    srv.destroy()
    assert isinstance(run.join(), TvmError)
    for s in (sshm, cshm):
        s.remove()


def test_penglai_names_keep_penglai_return_conventions(clean):
    assert P.open_device(clean.path) == 0
    try:
        enc, elf, args = P.PLenclave(), P.elf_args(), P.enclave_args()
        assert P.PLenclave_init(enc) == 0
        P.elf_args_init(elf, LOOP)
        P.enclave_args_init(args)
        args.name = "loop"
        assert P.PLenclave_create(enc, elf, args) == 0
        assert P.PLenclave_resume(enc) == NotStopped.code
        assert P.PLenclave_stop(enc) == 0
        assert P.PLenclave_stop(enc) == Stopped.code
        assert P.PLenclave_resume(enc) == 0
        assert P.PLenclave_destroy(enc) == 0
        assert P.PLenclave_stop(enc) < 0              # ended: what ended it
        assert P.PLenclave_stop(P.PLenclave()) < 0    # never created
    finally:
        P.close_device()


TUTORIAL = textwrap.dedent("""
    import os, sys
    from tvmrt.penglai import *
    from tvmrt import penglai

    enc = PLenclave()
    params = enclave_args()
    elf = elf_args()
    elf_args_init(elf, {hello!r})
    assert PLenclave_init(enc) == 0
    assert PLenclave_init(PLenclave()) == 0           # the device is opened once
    enclave_args_init(params)
    params.name = "hello-world"
    assert PLenclave_create(enc, elf, params) == 0
    assert PLenclave_run(enc) == 0
    mon = penglai._device.host.embedded
    print("MONITOR", mon.pid, mon.path, flush=True)
    PLenclave_destruct(enc)
    elf_args_destroy(elf)
    {tail}
""")


@pytest.mark.parametrize("tail", ["", "PLenclave_destroy(enc)", "os._exit(0)"])
def test_plenclave_init_without_a_monitor_starts_one_and_leaves_nothing(tmp_path, tail):
    """``tail``: the program ends normally with its enclave destroyed or not (atexit stops
    the monitor), or without running atexit at all (the monitor follows its parent)."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    env = dict(os.environ, TVMRT_SOCKET=str(tmp / "none.sock"), TMPDIR=str(tmp))
    env.pop("XDG_RUNTIME_DIR", None)
    code = TUTORIAL.format(hello=str(ROOT / "eapps" / "hello_world.py"), tail=tail)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "hello world!" in p.stdout
    said = [ln for ln in p.stderr.splitlines() if "started an embedded monitor" in ln]
    assert len(said) == 1, p.stderr
    assert str(tmp / "none.sock") in said[0]
    mon_pid = int(next(ln for ln in p.stdout.splitlines() if ln.startswith("MONITOR"))
                  .split()[1])

    def gone():
        try:
            return psutil.Process(mon_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    assert wait_until(gone, 15), "the embedded monitor outlived the program"

    def ours():
        out = []
        for q in psutil.process_iter(["cmdline"]):
            if any(str(tmp) in a for a in (q.info["cmdline"] or ())):
                out.append(q)
        return out
    assert wait_until(lambda: not ours(), 15), f"processes left: {ours()}"
    assert wait_until(lambda: not list(tmp.iterdir()), 15), list(tmp.iterdir())
    assert not shm_names(mon_pid)


def test_launch_test_stop_demo(clean):
    """``tvmrt launch test-stop loop``: Penglai's test-stop host, with what it saw."""
    p = subprocess.run([sys.executable, "-m", "tvmrt", "launch", "--socket", clean.path,
                        "test-stop", "loop"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "host0: stop enclave"
    assert "while stopped: frozen" in lines[1] and "after resume: moving" in lines[3]
    assert lines[-2:] == ["host: PLenclave run is finish ", "host: after exit the thread"]


@pytest.mark.timeout(120)
def test_a_stopped_caller_does_not_act_on_what_is_sent_after_its_stop(host):
    """``stop`` returns once the monitor has decided it; the zygote delivers the signal.
    What the monitor sends the stopped enclave after that (here: its server destroyed,
    the call's PeerDied and the loan back) must not reach it before the stop does, or
    it would return and exit while the host thinks it stopped.  The zygote is kept busy
    forking (creates in a thread) to widen the window."""
    busy = threading.Event()

    def churn():
        i = 0
        while not busy.is_set():
            host.create(eapp("loop_server"), name=f"churn-{i % 4}", type=SERVER).destroy()
            i += 1
    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(8):
            srv, caller, run, sshm, cshm = _chain(host)
            caller.stop()
            srv.destroy()
            assert caller.state == "stopped", "the caller ran on after its stop"
            caller.resume()
            assert run.join() == 0
            assert cshm.view.cast("i")[2] == PeerDied.code
            for s in (sshm, cshm):
                s.remove()
    finally:
        busy.set()
        t.join(30)
