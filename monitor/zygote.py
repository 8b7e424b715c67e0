"""The zygote: a fork server that starts enclave processes (Penglai's shadow enclave idea).

The monitor forks the zygote once at start-up, before it opens any peer socket,
so the zygote holds nothing but its own channel to the monitor.  The runtime is
already imported, so starting an enclave costs one ``fork`` (~1-2 ms) instead of
a Python start-up (~30 ms).

Protocol on the zygote channel (SOCK_SEQPACKET, msgpack):
    monitor -> zygote  {"op": "spawn", "k": peer, "spec": {...}}  fds: sock, stdout, stderr[, shm]
                       {"op": "kill", "k": peer}
                       {"op": "exit"}                    kill every enclave, reap, exit
    zygote -> monitor  {"op": "spawned", "k": peer, "pid": pid}
                       {"op": "spawn_failed", "k": peer, "why": text}
                       {"op": "exited", "k": peer, "how": text}

Every enclave gets ``PR_SET_PDEATHSIG(SIGKILL)`` (re-checked after fork), and
the zygote gets it towards the monitor, so no enclave outlives its monitor.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import traceback

from tvmrt import _memory as memory, _wire as wire


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


def serve(sock: socket.socket, monitor_pid: int) -> None:
    """Run the zygote loop on ``sock`` until the monitor says exit or goes away."""
    memory.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != monitor_pid:
        os._exit(0)
    os.setsid()                      # ^C in the monitor's terminal is the monitor's business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    memory.reserve_arenas()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children: dict[int, int] = {}    # pid -> peer
    by_peer: dict[int, int] = {}     # peer -> pid
    me = os.getpid()

    def reap():
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            peer = children.pop(pid, None)
            if peer is None:
                continue
            by_peer.pop(peer, None)
            try:
                wire.send(sock, {"op": "exited", "k": peer, "how": describe_status(status)})
            except Exception:
                pass

    def finish():
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(0)

    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            ready = []
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        reap()
        if sock.fileno() not in ready:
            continue
        try:
            msg, fds = wire.recv(sock, want_fds=True)
        except Exception:
            finish()
        op = msg.get("op")
        if op == "spawn":
            peer = msg["k"]
            try:
                pid = os.fork()
            except OSError as exc:
                wire.close_all(fds)
                wire.send(sock, {"op": "spawn_failed", "k": peer, "why": str(exc)})
                continue
            if pid == 0:
                _child(me, sock, (wake_r, wake_w), msg["spec"], fds)
            wire.close_all(fds)
            children[pid] = peer
            by_peer[peer] = pid
            wire.send(sock, {"op": "spawned", "k": peer, "pid": pid})
        elif op == "kill":
            kpid = by_peer.get(msg.get("k"))
            if kpid is not None:
                try:
                    os.kill(kpid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif op == "exit":
            finish()
        else:
            wire.close_all(fds)


def _child(zygote_pid, zsock, wake, spec, fds):
    """In the new enclave process: cut ties with the zygote, then run the eapp."""
    code = 70
    try:
        memory.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != zygote_pid:
            os._exit(code)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        zsock.close()
        for fd in wake:
            os.close(fd)
        enc_fd, out_fd, err_fd = fds[0], fds[1], fds[2]
        shm_fd = fds[3] if len(fds) > 3 else None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        from tvmrt import _runtime as eapp_runtime
        code = eapp_runtime.run(enc_fd, spec, shm_fd)
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
