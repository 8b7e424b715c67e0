"""The monitor daemon: a thin I/O shell around :class:`tvmrt.monitor.core.Core`.

One thread, one ``epoll`` loop.  The shell owns every socket and segment fd;
it turns socket traffic into core events and performs the effects the core
returns (send with fds, spawn through the zygote, kill, create/close segments).
Peer sockets are non-blocking: a peer that stops reading is cut off rather than
stalling the monitor.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import stat
import sys
import time
import traceback

import posix_ipc

from tvmrt import _memory as memory, _wire as wire
from tvmrt.errors import MonitorGone, ProtocolError, TvmError
from tvmrt._paths import default_socket_path

from . import zygote
from .core import Core, Limits

_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
EOF_GRACE = 1.0     # seconds to wait for EOF after an enclave process was reaped


def prepare_socket_dir(path: str) -> None:
    """Create the socket's directory 0700, or check an existing one is ours and private."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise TvmError(f"socket directory {d} is not a directory owned by this user")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)


class _Epoll:
    """Read-readiness on a plain ``select.epoll``, without ``selectors``' per-event
    overhead: ``poll`` returns the registered ``(kind, peer, fileobj)`` tuples."""

    def __init__(self):
        self.ep = select.epoll()
        self.reg: dict[int, tuple] = {}

    def register(self, fileobj, data):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.ep.register(fd, select.EPOLLIN)
        self.reg[fd] = (data[0], data[1], fileobj)

    def unregister(self, fileobj):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self.reg.pop(fd, None) is None:
            raise KeyError(fd)
        self.ep.unregister(fd)

    def poll(self, timeout):
        reg = self.reg
        out = []
        for fd, _ in self.ep.poll(-1 if timeout is None else timeout):
            r = reg.get(fd)
            if r is not None:
                out.append(r)
        return out

    def close(self):
        self.ep.close()


class Daemon:
    """Run the monitor on ``path`` until SIGINT/SIGTERM (or :meth:`stop`)."""

    def __init__(self, path: str | None = None, verbose: bool = False,
                 limits: Limits | None = None):
        self.path = path or default_socket_path()
        self.verbose = verbose
        self.core = Core(secrets.token_bytes(32), limits)
        self.socks: dict[int, socket.socket] = {}     # peer -> socket
        self.hosts: set[int] = set()                   # peers that are hosts
        self.segs: dict[int, posix_ipc.SharedMemory] = {}
        self.eof_deadline: dict[int, float] = {}
        self.running = False
        self.zpid = None
        self.zsock = None
        self._fds = []         # fds that came with the message being handled
        self._rid = None

    # ------------------------------------------------------------------ set-up
    def _start_zygote(self):
        mine, theirs = wire.seqpacket_pair()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 65536)
                zygote.serve(theirs, me)
            finally:
                os._exit(0)
        theirs.close()
        self.zpid, self.zsock = pid, mine

    def _listen(self):
        prepare_socket_dir(self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.path)
            probe.close()
            raise TvmError(f"a monitor is already listening on {self.path}")
        except (FileNotFoundError, ConnectionRefusedError):
            probe.close()
        if os.path.lexists(self.path):
            os.unlink(self.path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            ls.bind(self.path)
        finally:
            os.umask(old)
        ls.listen(64)
        ls.setblocking(False)
        return ls

    def run(self, ready_fd: int | None = None, announce: bool = True) -> int:
        """Serve until stopped; returns the exit code (0 on a clean stop)."""
        # The monitor maps nothing, but it reserves the arenas like every tvmrt process:
        # the zygote and every enclave inherit the reservation through fork.
        memory.reserve_arenas()
        self._start_zygote()
        try:
            self.listener = self._listen()
        except BaseException:
            self._stop_zygote()
            raise
        sel = self.sel = _Epoll()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        stop_sigs = (signal.SIGINT, signal.SIGTERM)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in stop_sigs}
        sel.register(self.listener, ("listen", None))
        sel.register(self.zsock, ("zygote", None))
        sel.register(wake_r, ("wake", None))
        self.running = True
        if announce:
            print(f"tvmrt monitor {os.getpid()} listening on {self.path}", flush=True)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        try:
            core = self.core
            while self.running:
                timed = self.eof_deadline or core.queued
                timeout = self._timeout() if timed else None
                for kind, peer, fileobj in sel.poll(timeout):
                    if kind == "peer":
                        self._on_peer(peer, fileobj)
                    elif kind == "listen":
                        self._on_accept()
                    elif kind == "zygote":
                        self._on_zygote()
                    else:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                if timed or self.eof_deadline or core.queued:
                    self._on_time()
        finally:
            self._shutdown()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _on_signal(self, signum, frame):
        self.running = False

    def stop(self):
        self.running = False

    # ------------------------------------------------------------------ events
    def _timeout(self):
        ds = list(self.eof_deadline.values())
        d = self.core.next_deadline()
        if d is not None:
            ds.append(d)
        if not ds:
            return None
        return max(0.0, min(ds) - time.monotonic())

    def _on_time(self):
        now = time.monotonic()
        for peer, d in list(self.eof_deadline.items()):
            if d <= now:
                self.eof_deadline.pop(peer, None)
                self._apply(self.core.disconnected(peer))
        d = self.core.next_deadline()
        if d is not None and d <= now:
            self._apply(self.core.tick(now))

    def _on_accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        cred = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, 12)
        pid, uid, _gid = (int.from_bytes(cred[i:i + 4], sys.byteorder) for i in (0, 4, 8))
        if uid != os.getuid() and uid != 0:
            conn.close()
            return
        wire.tune(conn)
        conn.setblocking(False)
        peer, fx = self.core.host_connected(uid, pid)
        self.hosts.add(peer)
        self.socks[peer] = conn
        self.sel.register(conn, ("peer", peer))
        self._apply(fx)

    def _cut_off(self, peer, exc):
        """The peer's socket hit EOF, an error or a malformed frame: disconnect it."""
        if isinstance(exc, ProtocolError):
            self._log(f"peer {peer}: {exc}; disconnecting it")
        self._drop_sock(peer)
        self._apply(self.core.disconnected(peer))

    def _internal_error(self, peer):
        # A bug must not take the monitor (and every other peer) down: cut off the peer
        # whose message hit it, say so, keep serving.
        print(f"tvmrt monitor: internal error on a message from peer {peer}; "
              f"disconnecting it", file=sys.stderr, flush=True)
        traceback.print_exc()
        self._drop_sock(peer)
        try:
            self._apply(self.core.disconnected(peer))
        except Exception:
            traceback.print_exc()

    def _on_peer(self, peer, sock):
        try:
            # only hosts send fds (their stdio at create); an enclave's would be dropped
            msg, fds = wire.recv(sock, want_fds=peer in self.hosts)
        except BlockingIOError:
            return
        except (MonitorGone, ProtocolError, OSError) as exc:
            self._cut_off(peer, exc)
            return
        self._fds = fds
        rid = msg.get("rid")
        self._rid = rid if isinstance(rid, int) else None
        try:
            self._apply(self.core.message(peer, msg, len(fds), time.monotonic()))
        except Exception:
            self._internal_error(peer)
        finally:
            if fds:
                wire.close_all(fds)
                self._fds = []

    def _on_zygote(self):
        try:
            msg, fds = wire.recv(self.zsock, want_fds=True)
        except BlockingIOError:
            return
        except Exception:
            self._log("the zygote went away; stopping")
            self.zpid_dead = True
            self.running = False
            return
        wire.close_all(fds)
        op, peer = msg.get("op"), msg.get("k")
        if op == "spawned":
            self._apply(self.core.spawned(peer, msg.get("pid")))
        elif op == "spawn_failed":
            self._drop_sock(peer)
            self._apply(self.core.spawn_failed(peer, msg.get("why", "?")))
        elif op == "exited":
            if peer in self.socks:
                self.eof_deadline[peer] = time.monotonic() + EOF_GRACE
            self._apply(self.core.exited(peer, msg.get("how", "?")))

    # ------------------------------------------------------------------ effects
    def _apply(self, fx):
        i = 0
        while i < len(fx):
            eff = fx[i]
            i += 1
            kind = eff[0]
            if kind == "send":
                self._send(eff[1], eff[2], eff[3])
            elif kind == "new_seg":
                if not self._new_seg(eff[1], eff[2]):
                    # the core answers with an error instead of the reply it queued
                    fx = self.core.segment_failed(eff[1], "cannot create shared memory",
                                                  self._rid, fx[i:])
                    i = 0
            elif kind == "free_seg":
                shm = self.segs.pop(eff[1], None)
                if shm is not None:
                    shm.close_fd()
            elif kind == "spawn":
                self._spawn(eff[1], eff[2], eff[3])
            elif kind == "kill":
                self._zsend({"op": "kill", "k": eff[1]})
            elif kind == "close":
                self.eof_deadline.pop(eff[1], None)
                self._drop_sock(eff[1])
            elif kind == "log":
                self._log(eff[1])

    def _send(self, peer, msg, segs):
        sock = self.socks.get(peer)
        if sock is None:
            return
        fds = [self.segs[s].fd for s in segs if s in self.segs] if segs else ()
        g = msg.get("g")
        if g:
            self._check_sizes(g)
        try:
            wire.send(sock, msg, fds)
        except (MonitorGone, BlockingIOError, OSError) as exc:
            # a peer that is gone or does not read is cut off; nobody else notices
            self._log(f"peer {peer}: send failed ({exc.__class__.__name__}); disconnecting")
            self._drop_sock(peer)
            self._apply(self.core.disconnected(peer))

    def _check_sizes(self, grants):
        """A holder of a segment fd could truncate it, so that the next owner dies of
        SIGBUS; put the size back before the segment changes hands (one fstat each)."""
        for seg, _vaddr, length, _has_fd in grants:
            shm = self.segs.get(seg)
            if shm is None:
                continue
            try:
                if os.fstat(shm.fd).st_size != length:
                    self._log(f"segment {seg} was resized by a holder; restoring it")
                    os.ftruncate(shm.fd, length)
            except OSError:
                pass

    def _new_seg(self, seg, size) -> bool:
        try:
            shm = posix_ipc.SharedMemory(None, posix_ipc.O_CREX, mode=0o600, size=size)
        except Exception as exc:
            self._log(f"cannot create a segment of {size} bytes: {exc}")
            return False
        try:
            shm.unlink()        # nothing can open it by name; the kernel frees it with us
        except Exception:
            pass
        self.segs[seg] = shm
        return True

    def _spawn(self, peer, spec, shm_seg):
        mine, theirs = wire.seqpacket_pair()
        mine.setblocking(False)
        self.socks[peer] = mine
        self.sel.register(mine, ("peer", peer))
        stdio = self._fds[:2] if len(self._fds) >= 2 else [1, 2]
        fds = [theirs.fileno()] + list(stdio)
        if shm_seg is not None and shm_seg in self.segs:
            fds.append(self.segs[shm_seg].fd)
        try:
            self._zsend({"op": "spawn", "k": peer, "spec": spec}, fds)
        finally:
            theirs.close()

    def _zsend(self, msg, fds=()):
        try:
            wire.send(self.zsock, msg, fds)
        except Exception:
            self._log("the zygote went away; stopping")
            self.running = False

    def _drop_sock(self, peer):
        sock = self.socks.pop(peer, None)
        self.hosts.discard(peer)
        if sock is not None:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _log(self, text):
        if self.verbose:
            print(f"tvmrt monitor: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ teardown
    def _shutdown(self):
        try:
            self._apply(self.core.shutdown())
        except Exception as exc:  # never let teardown leave processes behind
            self._log(f"shutdown: {exc!r}")
        for peer in list(self.socks):
            self._drop_sock(peer)
        for shm in self.segs.values():
            shm.close_fd()
        self.segs.clear()
        try:
            self.listener.close()
            os.unlink(self.path)
        except OSError:
            pass
        self._stop_zygote()

    def _stop_zygote(self):
        if self.zpid is None:
            return
        try:
            wire.send(self.zsock, {"op": "exit"})
        except Exception:
            pass
        deadline = time.monotonic() + 3.0
        while True:
            pid, _ = os.waitpid(self.zpid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.zpid, signal.SIGKILL)
                os.waitpid(self.zpid, 0)
                break
            time.sleep(0.005)
        self.zsock.close()
        self.zpid = None
