"""The zygote: a fork server that starts enclave processes (Penglai's shadow enclave idea).

The monitor forks the zygote once at start-up, before it opens any peer socket,
so the zygote holds nothing but its own channel to the monitor.  The runtime is
already imported, so starting an enclave costs one ``fork`` (~1-2 ms) instead of
a Python start-up (~30 ms).

**Warm processes.**  The fork is not even on a create's path: the zygote keeps
:data:`POOL_SIZE` processes forked ahead (:func:`_warm`).  Each closes every fd but
its channel, its pipe (below) and ``/dev/null``, starts its process group, enters the
sandbox, rehearses the runtime's set-up, and says ``warm``; the zygote then hands the
other end of its channel to the monitor and keeps none.  A create is one ``become``
message from the monitor on that channel (the spec, the host's stdout/stderr, the shm
segment), which from then on is the enclave's channel to the monitor; the monitor tells the zygote
whose process it is (``assigned``), and the zygote forks the next one once that
enclave has said ``ready`` (a pipe the warm process closes then; at once if the monitor
has none left), so that the fork does not compete with the start.  Only when the
monitor has none left does it ask the zygote to ``spawn`` (a warm process forked for
that create, given the enclave's socket with the spec).  A warm process forked after a
spawn holds none of that enclave's fds: the zygote closes a spawn's fds before it
forks anything else.  docs/design.md, "Creating an enclave", has the figures.

Protocol on the zygote channel (SOCK_SEQPACKET, msgpack):
    monitor -> zygote  {"op": "assigned", "k": peer, "pid": pid}  warm process pid is
                                                         enclave peer's now
                       {"op": "drop", "pid": pid}        the monitor could not use it
                       {"op": "spawn", "k": peer, "spec": {...}}  fds: sock, stdout, stderr[, shm]
                       {"op": "kill", "k": peer}
                       {"op": "signal", "k": peer, "sig": "stop" | "cont"[, "ack": 1]}
                       {"op": "exit"}                    kill every enclave, reap, exit
    zygote -> monitor  {"op": "signalled", "k": peer}  a signal asked with "ack" was sent
    zygote -> monitor  {"op": "warm", "pid": pid}  fds: the warm process's channel[, its
                                                   /proc/self/maps in strict mode]
                       {"op": "spawned", "k": peer, "pid": pid}
                       {"op": "spawn_failed", "k": peer, "why": text}
                       {"op": "exited", "k": peer, "how": text}
                       {"op": "maps", "k": peer}  fd: its /proc/self/maps (strict mode,
                       for a spawned one)
    warm -> zygote     {"op": "warm"}  [fd: its /proc/self/maps, opened before the sandbox]
    monitor -> warm    {"op": "become", "k": peer, "spec": {...}}  fds: stdout, stderr[, shm]
    (zygote -> warm    the same with "sock": 1, fds: sock, stdout, stderr[, shm])

An enclave is its main process and everything it forks: they end together.
Each enclave process starts a process group of its own (``setpgid`` before the
eapp runs), whose id is its pid -- not a session: the kernel's autogroup scheduler
makes every session a scheduling group, which slowed calls down.  The
zygote is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process orphaned
below an enclave is re-parented to the zygote, not to init.

* The enclave is killed (``kill``): SIGKILL to its group and to its main process
  (SIGKILL ends a stopped process too).
* The enclave is stopped or continued (``signal``): SIGSTOP / SIGCONT to its group and
  to its main process.  Stopped children are not reported (``waitid`` asks for exits
  only).
* Its main process ends (by itself or killed): before the zygote reaps it -- the
  zombie keeps its pid, so the group id cannot be reused meanwhile -- SIGKILL to
  the group, then ``exited`` to the monitor.
* A process adopted by the zygote (an orphan) is left alone while it belongs to
  a live enclave (its group is the enclave's); otherwise -- its enclave has
  ended, or it left its enclave's group, so nothing tells which enclave it came
  from -- it is killed (with its group).  Orphans are reaped
  silently: only an enclave's main process makes an ``exited``.
* The zygote ends (``exit``, its channel closes, or SIGTERM -- its
  ``PR_SET_PDEATHSIG`` towards the monitor, so it can clean up): it kills every
  group and every child, and keeps killing what is re-parented to it until it
  has no child left.

Every enclave process (warm ones too) also gets ``PR_SET_PDEATHSIG(SIGKILL)`` towards
the zygote (re-checked after fork), for when the zygote itself is SIGKILLed.  Warm
processes are the zygote's children like enclaves: killed with the rest when it ends,
reaped silently if killed from outside (then the monitor's ``assigned`` is answered
with ``exited``, and the pool is refilled).

Before the eapp's code runs, every enclave process keeps only the fds it is meant to
have -- 0 (``/dev/null``: never the monitor's terminal), 1 and 2 (what its host gave),
its channel to the monitor, its shared-memory segment until mapped and its pipe to the
zygote until it has said ready -- and enters
the sandbox (:mod:`tvmrt._sandbox`), whose Landlock ruleset and seccomp program the
zygote builds once at start.  An enclave that cannot enter it ends (exit status 70,
the reason on its stderr): it never runs with less than ``ps`` shows.
"""
from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import socket
import sys
import traceback

from tvmrt import _memory as memory, _sandbox, _trace, _wire as wire


def describe_status(status: int) -> str:
    """Human text for a wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by signal {sig} ({name})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """Make this process the reaper of orphans below it (instead of init)."""
    if memory._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def child_pids() -> list[int]:
    """Pids of this process's children (adopted orphans included), zombies included."""
    me = os.getpid()
    out: list[int] = []
    tasks = f"/proc/{me}/task"
    if os.path.exists(f"{tasks}/{me}/children"):
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/children") as f:
                    out.extend(int(p) for p in f.read().split())
            except FileNotFoundError:
                pass        # a thread that ended meanwhile
        return out
    # a kernel without CONFIG_PROC_CHILDREN: read every process's parent
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue        # ended meanwhile
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
            out.append(int(name))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (if any) and the process ``pid``.

    Only for a pid that is this process's unreaped child: then neither the pid nor
    the group id can have been reused by an unrelated process."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_SIGNALS = {"stop": signal.SIGSTOP, "cont": signal.SIGCONT}


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` leads and to ``pid`` (the same rule as
    :func:`kill_tree`: ``pid`` is an unreaped child of this process)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


#: warm enclave processes kept forked ahead (see the module docstring): two, so that a
#: create finds one while the zygote forks the next, and each idle one costs its pages
POOL_SIZE = 2
#: what a warm process calls itself (``ps``, /proc/PID/comm) until it becomes an enclave
WARM_NAME = b"tvmrt-warm"


def serve(sock: socket.socket, monitor_pid: int, sandbox: str = "off",
          support: _sandbox.Support | None = None, maps: bool = False,
          pool: int = POOL_SIZE) -> None:
    """Run the zygote loop on ``sock`` until the monitor says exit or goes away.

    ``sandbox`` is the state every enclave gets (:func:`tvmrt._sandbox.level` of
    ``support``); the zygote is non-dumpable unless it is ``off``.  ``maps`` (strict
    isolation): every enclave opens its ``/proc/self/maps`` for the monitor before its
    sandbox.  ``pool``: how many warm processes to keep."""
    # SIGTERM, not SIGKILL, when the monitor dies: the zygote must live on long enough to
    # kill its enclaves' groups (a grandchild does not inherit anyone's PDEATHSIG).
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(True))
    memory.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != monitor_pid:
        os._exit(0)
    os.setsid()                      # ^C in the monitor's terminal is the monitor's business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        set_child_subreaper()
    except OSError as exc:
        print(f"tvmrt zygote: {exc}; processes orphaned in an enclave go to init",
              file=sys.stderr, flush=True)
    memory.reserve_arenas()
    # Imported here, once: an enclave then starts without reading a file, and its
    # runtime and eapp API are in place before its sandbox forbids most reads.
    import tvmrt.eapp  # noqa: F401
    from tvmrt import _runtime  # noqa: F401
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    prepared: _sandbox.Prepared | None = None
    unprepared = None
    try:
        if sandbox != "off":
            _sandbox.set_dumpable(False)
        prepared = _sandbox.Prepared(sandbox, support or _sandbox.probe())
    except Exception as exc:
        # every create is then refused with this reason (no enclave runs unsandboxed)
        unprepared = f"cannot prepare the enclave sandbox ({sandbox}): {exc}"
        print(f"tvmrt zygote: {unprepared}", file=sys.stderr, flush=True)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children: dict[int, int] = {}    # enclave main pid -> peer
    by_peer: dict[int, int] = {}     # peer -> enclave main pid
    # Warm processes not yet assigned to an enclave: pid -> the zygote's end of the
    # process's channel while it gets ready, None once that end went to the monitor.
    warm: dict[int, socket.socket | None] = {}
    # warm processes handed to the monitor that died before it assigned them: pid -> how
    # (told as the enclave's end if the monitor assigns it; dropped when it says drop)
    dead: dict[int, str] = {}
    # Each warm process holds the write end of a pipe until its enclave has said ready
    # (or ended): pid -> the read end.  The zygote forks the next warm process when that
    # end reads EOF -- a fork is ~1.5 ms of CPU and must not compete with the start it
    # is meant to speed up (pinned to one CPU, it tripled create-to-ready) -- or at
    # once when the monitor has no warm process left.
    gates: dict[int, int] = {}
    me = os.getpid()
    with open("/proc/self/comm", "rb") as f:
        comm = f.read().strip()      # what an enclave calls itself (the zygote's name)
    # Everything imported so far lives as long as the zygote: moved out of the collector's
    # reach, a child's collections never write to (and so copy) those pages.
    gc.freeze()

    def fork_warm(rehearse: bool = True) -> tuple[int, socket.socket]:
        """Fork one warm process (see :func:`_warm`); returns its pid and the zygote's
        end of its channel.  The zygote holds no enclave's fds now (a spawn's are closed
        before anything else is forked), so the new process inherits none; what it does
        inherit (the channels of the monitor and of other warm processes) it closes
        before anything else."""
        zend, cend = wire.seqpacket_pair()
        try:
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            zend.close()
            cend.close()
            raise
        try:
            pid = os.fork()
        except BaseException:
            for fd in (gate_r, gate_w):
                os.close(fd)
            zend.close()
            cend.close()
            raise
        if pid == 0:
            _warm(me, cend, gate_w, prepared, devnull, maps, comm, rehearse)
        os.close(gate_w)
        cend.close()
        gates[pid] = gate_r
        return pid, zend

    def refill() -> int:
        """Fork warm processes up to ``pool``; returns the forks the idle loop may try
        until the next assignment (below): ``pool``, or 0 when a fork failed (out of
        processes or memory: a create then waits for a fork of its own)."""
        while prepared is not None and len(warm) < pool:
            try:
                pid, zend = fork_warm()
            except OSError:
                return 0
            warm[pid] = zend
        return pool

    def announce(pid: int, zend: socket.socket) -> None:
        """A warm process said it is ready (with its maps fd in strict mode): hand its
        channel to the monitor, which makes it an enclave without asking the zygote."""
        warm[pid] = None
        try:
            msg, mfds = wire.recv(zend, want_fds=True)
        except Exception:
            kill_tree(pid)           # died or said nonsense: reaped (silently) by reap()
            warm.pop(pid, None)
            zend.close()
            return
        try:
            if msg.get("op") == "warm":
                wire.send(sock, {"op": "warm", "pid": pid}, [zend.fileno(), *mfds])
            else:
                kill_tree(pid)
                warm.pop(pid, None)
        finally:
            wire.close_all(mfds)
            zend.close()

    def spawn_now(peer, spec, fds) -> int | None:
        """No warm process was at hand (the monitor's were used up): take one that is
        still getting ready (a burst outran the refill: its fork is paid already), else
        fork one for ``peer`` without the rehearsal (it would only add to this wait);
        wait until it is ready, and give it the enclave's socket too (the first of
        ``fds``).  Its pid, or None when it could not start (the monitor is told why)."""
        pid = next((p for p, z in warm.items() if z is not None), None)
        if pid is not None:
            zend = warm.pop(pid)
            assert zend is not None
        else:
            try:
                pid, zend = fork_warm(rehearse=False)
            except OSError as exc:
                wire.send(sock, {"op": "spawn_failed", "k": peer, "why": str(exc)})
                return None
        try:
            _, mfds = wire.recv(zend, want_fds=True)
        except Exception as exc:
            kill_tree(pid)           # reaped (silently) by reap()
            zend.close()
            wire.send(sock, {"op": "spawn_failed", "k": peer,
                             "why": f"the new process went away ({exc})"})
            return None
        try:
            if mfds:
                wire.send(sock, {"op": "maps", "k": peer}, mfds)
        finally:
            wire.close_all(mfds)
        # the monitor learns the pid before the enclave can say ready (a warm process
        # answers at once): ``ps`` after a create shows it
        enlist(pid, peer)
        wire.send(sock, {"op": "spawned", "k": peer, "pid": pid})
        try:
            wire.send(zend, {"op": "become", "k": peer, "spec": spec, "sock": 1}, fds)
        except Exception:
            kill_tree(pid)           # its end is reported as the enclave's (``exited``)
        finally:
            zend.close()
        return pid

    def reap():
        """Reap every child that ended; an enclave's group is killed before its leader is
        reaped, and only an enclave's main process is reported."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            peer = children.pop(pid, None)
            if peer is not None:
                kill_tree(pid)       # the rest of the enclave (the leader is a zombie)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            gate = gates.pop(pid, None)
            if gate is not None:
                os.close(gate)
            if pid in warm:
                zend = warm.pop(pid)
                if zend is None:     # the monitor holds its channel: tell it if it asks
                    dead[pid] = describe_status(status)
                else:
                    zend.close()
                continue             # killed from outside: the pool is refilled later
            if peer is None:
                continue             # an adopted orphan: reaped silently
            by_peer.pop(peer, None)
            try:
                wire.send(sock, {"op": "exited", "k": peer, "how": describe_status(status)})
            except Exception:
                pass

    def sweep():
        """Kill every adopted orphan that belongs to no live enclave."""
        for pid in child_pids():
            if pid in children or pid in warm:
                continue
            try:
                if os.getsid(pid) in children or os.getpgid(pid) in children:
                    continue         # still part of a running enclave: it ends with it
            except ProcessLookupError:
                continue
            kill_tree(pid)

    def finish():
        # Kill every group and every child; a child's death re-parents its orphans to us
        # (before we can reap it), so kill again after each reap until no child is left.
        while True:
            for pid in set(children) | set(child_pids()):
                kill_tree(pid)
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            children.pop(pid, None)

    def enlist(pid, peer) -> None:
        children[pid] = peer
        by_peer[peer] = pid

    # A pool short of processes (one was killed from outside, or a fork failed) is
    # refilled when nothing else is waiting, with at most ``pool`` such forks between
    # two assignments: processes that die as soon as they are forked must not make the
    # zygote fork in a loop.
    idle_forks = refill()
    while True:
        if stop:
            finish()
        short = idle_forks > 0 and len(warm) < pool and prepared is not None
        getting_ready = {z.fileno(): (pid, z) for pid, z in warm.items() if z is not None}
        starting = {fd: pid for pid, fd in gates.items() if pid in children}
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r, *getting_ready, *starting],
                                        [], [], 0 if short else None)
        except InterruptedError:
            ready = []
        reap()
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            # A signal (SIGCHLD): a death may have handed us orphans.  Every enclave's end
            # is one, so the sweep after it finds whatever is left of that enclave.
            sweep()
        if stop:
            continue
        for fd in ready:
            w = getting_ready.get(fd)
            if w is not None and warm.get(w[0]) is w[1]:
                announce(*w)
            spid = starting.get(fd)
            if spid is not None and gates.get(spid) == fd:
                # an enclave said ready (or ended, or wrote: the eapp holds the fd too)
                os.close(gates.pop(spid))
                idle_forks = refill()
        if sock.fileno() not in ready:
            if not ready and short:
                idle_forks -= 1
                try:
                    pid, zend = fork_warm()
                    warm[pid] = zend
                except OSError:
                    idle_forks = 0
            continue
        try:
            msg, fds = wire.recv(sock, want_fds=True)
        except Exception:
            finish()
        op = msg.get("op")
        if op == "assigned":
            # the monitor made warm process ``pid`` the enclave ``k``
            apid, peer = msg.get("pid"), msg.get("k")
            if apid in warm:
                del warm[apid]
                enlist(apid, peer)
            else:
                how = dead.pop(apid, "ended before it was started")
                wire.send(sock, {"op": "exited", "k": peer, "how": how})
            if not warm:
                # the monitor has none left: the next create must not wait for a fork
                idle_forks = refill()
        elif op == "drop":
            # the monitor could not use warm process ``pid`` (its channel was closed)
            dpid = msg.get("pid")
            dead.pop(dpid, None)
            if warm.get(dpid, 1) is None:
                del warm[dpid]       # reaped (silently) as an orphan
                kill_tree(dpid)
            # refilled by the idle forks only: a monitor out of fds drops every warm
            # process it is handed, and must not make the zygote fork in a loop
        elif op == "spawn":
            if _trace.FD is not None:
                _trace.mark("z_spawn")
            peer = msg["k"]
            if prepared is None:
                wire.close_all(fds)
                wire.send(sock, {"op": "spawn_failed", "k": peer, "why": unprepared})
                continue
            try:
                spid = spawn_now(peer, msg["spec"], fds)
            finally:
                wire.close_all(fds)
            if spid is None:
                continue
            # the monitor had none left: a burst, or forks failed before (then try again)
            idle_forks = refill()
        elif op == "kill":
            kpid = by_peer.get(msg.get("k"))
            if kpid is not None:
                # the group may not exist yet (the child has not run setpgid): then the
                # process itself is killed before it could fork anything
                kill_tree(kpid)
        elif op == "signal":
            kpid = by_peer.get(msg.get("k"))
            sig = _SIGNALS.get(msg.get("sig"))
            if kpid is not None and sig is not None:
                signal_tree(kpid, sig)
            if msg.get("ack"):
                # the monitor holds what it sends the peer until its stop is delivered
                wire.send(sock, {"op": "signalled", "k": msg.get("k")})
        elif op == "exit":
            finish()
        else:
            wire.close_all(fds)


def _warm(zygote_pid, chan, gate, prepared, devnull, maps, comm, rehearse=True):
    """A warm process: cut ties with the zygote, keep only its channel, enter the
    sandbox, say ``warm`` (the zygote then hands the channel to the monitor), wait for
    the ``become`` that makes it an enclave, and run its eapp.  Everything before the
    wait is off a create's critical path."""
    code = 70
    failed = None
    try:
        memory.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != zygote_pid:
            os._exit(code)
        memory.set_name(WARM_NAME)  # for ps, and for tests that tell them from enclaves
        # A process group of its own before the eapp runs: whatever it forks is in this
        # group, which the zygote kills when the enclave ends.  Not a session: with the
        # kernel's autogroup scheduling every session is a scheduling group of its own,
        # and one per enclave made a call 15-30 % slower on one CPU (docs/design.md).
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every fd but its channel goes now: the zygote's channel to the monitor, other
        # warm processes' channels, its stdio (the monitor's: an enclave gets its host's
        # with ``become``).  The ruleset fd is closed by enter().
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        keep = {chan.fileno(), gate, *prepared.fds()}
        if _trace.FD is not None:
            keep.add(_trace.FD)
        lo = 3
        for fd in sorted(keep):
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 20)
        mfds = []
        if maps:
            # Strict mode: the monitor reads this process's maps before every grant.  It
            # could not open them itself (this process is non-dumpable and the monitor
            # may not be root), but the kernel checks access at open only: a process
            # may always open its own, and the fd sent now stays readable.
            mfds.append(os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC))
        from tvmrt import _runtime as eapp_runtime
        try:
            prepared.enter()
        except OSError as exc:
            # said when there is an enclave (and its host's stderr) to say it to
            failed = exc
        else:
            try:
                if rehearse:
                    eapp_runtime.rehearse(chan)
            except Exception:
                pass                 # only a head start: the create does it for real
        try:
            wire.send(chan, {"op": "warm"}, mfds)
        finally:
            wire.close_all(mfds)
        try:
            msg, fds = wire.recv(chan, want_fds=True)
        except Exception:
            os._exit(0)              # the monitor or the zygote let go: no enclave
        if _trace.FD is not None:
            _trace.mark("c_start")
        if msg.get("sock"):
            chan.close()             # the zygote started this one for a create: its
            enc_fd = fds.pop(0)      # socket came with the spec
        else:
            enc_fd = chan.detach()   # the monitor's own channel to this process
        spec = msg["spec"]
        spec["k"] = msg["k"]
        out_fd, err_fd = fds[0], fds[1]
        shm_fd = fds[2] if len(fds) > 2 else None
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        memory.set_name(comm)
        if failed is not None:
            print(f"tvmrt: enclave {spec.get('name')!r} cannot enter its sandbox "
                  f"({prepared.state}): {failed}", file=sys.stderr, flush=True)
            os._exit(code)
        if _trace.FD is not None:
            _trace.mark("c_sandbox")
        code = eapp_runtime.run(enc_fd, spec, shm_fd, gate)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)
