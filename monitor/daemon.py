"""The monitor daemon: a thin I/O shell around :class:`tvmrt.monitor.core.Core`.

One thread, one ``epoll`` loop.  The shell owns every socket and segment fd;
it turns socket traffic into core events and performs the effects the core
returns (send with fds, spawn through the zygote, kill, create/close segments).
Peer sockets are non-blocking: a peer that stops reading is cut off rather than
stalling the monitor.
"""
from __future__ import annotations

import errno
import fcntl
import os
import resource
import secrets
import select
import signal
import socket
import stat
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import replace

from tvmrt import _memory as memory, _sandbox, _trace, _wire as wire
from tvmrt._paths import default_socket_path
from tvmrt.errors import (
    MonitorGone,
    NotPermitted,
    ProtocolError,
    ResourceExhausted,
    TvmError,
)

from . import zygote
from .config import ISOLATION_MODES, Config
from .core import Core
from .effects import (
    Close,
    FreeSeg,
    Kill,
    Log,
    NewSeg,
    Send,
    Signal,
    Spawn,
    SplitSeg,
    Stats,
    Verify,
)

_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
_MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)
#: follow-on reads chained after one epoll event (bounds what one pair can take)
_FOLLOW_CHAIN = 8
#: the hit score's ceiling, and how many messages pass between probes while it is cold
_FOLLOW_MAX = 8
_FOLLOW_PROBE = 32


#: longest path a Unix socket address holds (sun_path is 108 bytes with its NUL)
_SUN_PATH_MAX = 107


_MAPS_BUF = bytearray(1 << 18)

#: PROCMAP_QUERY (Linux 6.11): an ioctl on a ``/proc/PID/maps`` fd that answers "the
#: file-backed mapping covering this address, or the next one" as numbers, without
#: formatting any text.  ``struct procmap_query`` is 13 u64 slots here (104 bytes): in
#: [0] size, [1] flags, [2] address; out [3] start, [4] end, [8] inode, [9] device
#: (major | minor << 32)
_PMQ_SIZE = 104
_PROCMAP_QUERY = (3 << 30) | (_PMQ_SIZE << 16) | (ord("f") << 8) | 17
_PMQ_COVERING_OR_NEXT_FILE = 0x10 | 0x20
_PMQ_BUF = bytearray(_PMQ_SIZE)
_PMQ = memoryview(_PMQ_BUF).cast("Q")
_PMQ[0] = _PMQ_SIZE
_PMQ[1] = _PMQ_COVERING_OR_NEXT_FILE
_ADDR_END = 1 << 64


def _pmq_find(fd: int, lo: int, hi: int, idents) -> tuple[int, int] | None:
    """The first file mapping in ``[lo, hi)`` of the process whose maps ``fd`` is that
    maps a file of ``idents`` ((inode, device) pairs): its pair, else None.  One
    PROCMAP_QUERY per file-backed mapping from ``lo`` (the kernel skips the anonymous
    ones); OSError from the ioctl (ENOTTY before Linux 6.11)."""
    q = _PMQ
    buf = _PMQ_BUF
    ioctl = fcntl.ioctl
    addr = lo
    while addr < hi:
        q[2] = addr
        try:
            ioctl(fd, _PROCMAP_QUERY, buf, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None         # no file mapping from here on
            raise
        if q[3] >= hi:
            return None
        if (q[8], q[9]) in idents:
            return q[8], q[9]
        addr = q[4]
    return None


def _read_maps(fd: int) -> int:
    """Read the whole text of a ``/proc/PID/maps`` through an open fd, from its start,
    into ``_MAPS_BUF`` (kept for the purpose, grown when a text fills it); returns its
    length.  seq_file hands out about a page per read, so this reads on at the offset
    it reached (the kernel continues where it stopped) until a read returns nothing."""
    global _MAPS_BUF
    buf = _MAPS_BUF
    mv = memoryview(buf)
    off = 0
    while True:
        if off == len(buf):
            buf = _MAPS_BUF = buf + bytearray(len(buf))
            mv = memoryview(buf)
        n = os.preadv(fd, [mv[off:]], off)
        if not n:
            return off
        off += n


def _raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit.

    Every live segment is an fd of the monitor, and one enclave may hold
    ``Config.max_regions`` (1,024) regions: at the usual soft limit of 1,024 a single
    enclave flooding ``eapp_mmap`` within its own quota took every fd the monitor had,
    and the others could no longer get a region, be created or connect
    (tests/test_hostile.py).  The hard limit is the administrator's word (at EMFILE the
    monitor still refuses just the one asking).  Called after the zygote is forked: the
    enclaves keep the limit they were given."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            with open("/proc/sys/fs/nr_open") as f:      # the kernel's own ceiling
                hard = int(f.read())
        if soft == resource.RLIM_INFINITY or soft >= hard:
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
    except (OSError, ValueError):
        pass                    # kept as it is: the monitor works, with fewer regions


def prepare_socket_path(path: str) -> str | None:
    """Make ready to bind a socket at ``path``, changing nothing the monitor did not make.

    A missing directory is created 0700 (its name is returned: the monitor created it
    and removes it when it stops, if empty); an existing one is used as it is -- never
    chmodded -- if this user may create in it and nobody else can replace a socket in
    it (it is private, or sticky like /tmp); a symlink to such a directory is fine.  At
    the path itself only a stale socket of this user is removed; a live monitor, any
    other file, or another user's socket is refused.  Every refusal is a
    :class:`TvmError` with one line that says what to do.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise TvmError(f"socket path {path} is too long: a Unix socket path has at most "
                       f"{_SUN_PATH_MAX} bytes; choose a shorter --socket")
    d = os.path.dirname(path)
    created = None
    if not os.path.lexists(d):
        try:
            os.makedirs(d, mode=0o700)
        except OSError as exc:
            raise TvmError(f"cannot create the socket directory {d}: "
                           f"{exc.strerror}") from None
        created = d
    try:
        st = os.stat(d)                      # follows a symlink to the directory
    except OSError as exc:
        raise TvmError(f"socket directory {d}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TvmError(f"{d} is not a directory; choose another --socket")
    if not os.access(d, os.W_OK | os.X_OK):
        raise TvmError(f"cannot create a socket in {d}: permission denied")
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        raise TvmError(f"socket directory {d} belongs to uid {st.st_uid}, not to this "
                       f"user; choose a directory of your own")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise TvmError(f"socket directory {d} is writable by others and not sticky "
                       f"(anyone could replace the socket); choose a private directory")
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return created
    except OSError as exc:
        raise TvmError(f"socket path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(lst.st_mode):
        kind = ("a directory" if stat.S_ISDIR(lst.st_mode) else
                "a symbolic link" if stat.S_ISLNK(lst.st_mode) else
                "a regular file" if stat.S_ISREG(lst.st_mode) else "not a socket")
        raise TvmError(f"{path} exists and is {kind}; remove it or choose another --socket")
    if lst.st_uid != uid:
        raise TvmError(f"{path} is a socket of uid {lst.st_uid}; choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass                                  # stale: its monitor is gone
    except OSError as exc:
        raise TvmError(f"socket path {path}: {exc.strerror}") from None
    else:
        raise TvmError(f"a monitor is already listening on {path}")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TvmError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
    return created


#: seconds accept waits when even the reserve fd could not take a client
_ACCEPT_PAUSE = 0.1


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _close_warm(chan: socket.socket, mfd: int | None) -> None:
    """Close what the monitor holds of a warm process: its channel, its maps fd."""
    chan.close()
    if mfd is not None:
        os.close(mfd)


def _bye(conn: socket.socket, exc: TvmError) -> None:
    """Tell a client why it is being disconnected (protocol ``bye``), then close it."""
    try:
        conn.setblocking(False)
        wire.send(conn, {"op": "bye", "c": exc.code, "why": exc.reason})
        # read what the client sent already (a client sends its first request as soon as
        # it is connected): closing with unread data makes the kernel reset the
        # connection, and the client would read ECONNRESET instead of the bye
        for _ in range(64):
            if not conn.recv(1):
                break
    except (TvmError, OSError):
        pass
    finally:
        conn.close()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
    """Run the monitor on ``path`` until SIGINT/SIGTERM (or :meth:`stop`).

    With ``sandbox`` (the default) the monitor and its zygote are non-dumpable and every
    enclave process enters the sandbox of :mod:`tvmrt._sandbox`, with what this kernel
    offers; ``sandbox=False`` (``--no-sandbox``, for debugging) turns all of it off.
    Either way :meth:`run` says on stderr, in one line, what is missing or off."""

    def __init__(self, path: str | None = None, verbose: bool = False,
                 config: Config | None = None, sandbox: bool = True,
                 key_file: str | None = None, allow_uids: Iterable[int] = (),
                 isolation: str | None = None):
        self.path = path or default_socket_path()
        # hosts of these uids are served too (``--allow-uid``); their enclaves run as
        # this monitor's uid, which is why it is asked for by name
        self.allow_uids = frozenset(allow_uids) | {os.getuid(), 0}
        self.verbose = verbose
        self.support = _sandbox.probe()
        self.sandbox = _sandbox.level(self.support, sandbox)
        self._config = config
        self._key_file = key_file
        self.isolation = isolation or (config.isolation if config else "mprotect")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}")
        # strict mode: each enclave's /proc/self/maps, opened by the enclave itself
        # before it became non-dumpable and sent over the zygote channel (peer -> fd):
        # the kernel checks access when the file is opened, so the monitor can read an
        # enclave's maps through it even as a non-root user (docs/design.md)
        self.maps: dict[int, int] = {}
        #: warm processes the zygote handed over, oldest first: (pid, channel, maps fd
        #: or None).  A create makes one of them its enclave by a message on its
        #: channel, without a round trip through the zygote (docs/design.md).
        self.warm: deque[tuple[int, socket.socket, int | None]] = deque()
        self._pmq = True        # PROCMAP_QUERY works here (until ENOTTY says not)
        self.core: Core = None      # type: ignore[assignment]  # set by run()
        self.socks: dict[int, socket.socket] = {}     # peer -> socket
        self.hosts: set[int] = set()                   # peers that are hosts
        self.segs: dict[int, _SegFd] = {}
        self.running = False
        self.zpid: int | None = None
        self.zsock: socket.socket = None      # type: ignore[assignment]  # set by run()
        self._fds: list[int] = []   # fds that came with the message being handled
        self._seg_prefix = f"tvmrt.{os.getpid()}."
        self._rx = wire.Receiver()
        self._made_dir: str | None = None   # the socket directory, if this monitor made it
        self._sock_id: tuple[int, int] | None = None
        # one fd kept in reserve: at EMFILE it is given up to accept and refuse a client
        self._reserve: int | None = None
        self._accept_paused = 0.0           # monotonic time until which accept waits
        self._sent_to: int | None = None    # the last peer a message went to
        #: peers whose stop the zygote has not delivered yet -> [stops not acknowledged
        #: yet, the Sends held for them]:
        #: a message must not reach a process that is to be stopped before the stop does
        #: (it would act on it: a stopped caller whose server was destroyed would
        #: return and exit)
        self._stopping: dict[int, list] = {}
        self._hits = _FOLLOW_MAX            # score of recent follow-on reads that found one
        self._probe = 0

    # ------------------------------------------------------------------ set-up
    def _start_zygote(self):
        # Before any peer socket exists: the zygote inherits nothing but its channel.
        mine, theirs = wire.seqpacket_pair()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 65536)
                _trace.FD = None
                _trace.reopen()         # debug only: the closeranges took its fd
                zygote.serve(theirs, me, self.sandbox, self.support,
                             maps=self.isolation == "strict")
            finally:
                os._exit(0)
        theirs.close()
        self.zpid, self.zsock = pid, mine

    def _make_core(self) -> Core:
        """The core, with the monitor's key: loaded (``key_file``, made if missing), from
        ``config``, else drawn fresh.  Called after the zygote is forked, so that the key
        never exists in the zygote's memory and so in no enclave's (each is a fork of the
        zygote): an enclave that searched its own memory would find nothing to sign with."""
        if self._key_file is not None:
            from .keyfile import load_or_create_key
            key = load_or_create_key(self._key_file)
        elif self._config is not None:
            key = self._config.key
        else:
            key = secrets.token_bytes(32)
        base = self._config or Config(key=key)
        return Core(replace(base, key=key, sandbox=self.sandbox, isolation=self.isolation))

    def _listen(self):
        """Bind and listen on :attr:`path` (see :func:`prepare_socket_path`)."""
        self._made_dir = prepare_socket_path(self.path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            ls.bind(self.path)
        except OSError as exc:
            ls.close()
            self._remove_made_dir()
            raise TvmError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        self._sock_id = _identity(self.path)
        ls.listen(64)
        ls.setblocking(False)
        return ls

    def _remove_made_dir(self):
        if self._made_dir is not None:
            try:
                os.rmdir(self._made_dir)          # only if empty: never anyone's files
            except OSError:
                pass
            self._made_dir = None

    def run(self, ready_fd: int | None = None, announce: bool = True) -> int:
        """Serve until stopped; returns the exit code (0 on a clean stop)."""
        # Stop signals first: one that arrives while the daemon sets up (the socket path
        # exists before the loop runs) is recorded and honoured, never lost.
        self.running = True
        stop_sigs = (signal.SIGINT, signal.SIGTERM)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in stop_sigs}
        try:
            self._announce_sandbox()
            # The monitor maps nothing, but it reserves the arenas like every tvmrt
            # process: the zygote and every enclave inherit the reservation through fork.
            memory.reserve_arenas()
            self._start_zygote()
            _raise_fd_limit()
            try:
                self.core = self._make_core()
                if _trace.FD is not None:
                    self.core.message = _trace.traced_message(  # type: ignore[method-assign]
                        self.core.message)
                self.listener = self._listen()
            except BaseException:
                self._stop_zygote()
                raise
        except BaseException:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            raise
        sel = self.sel = _Epoll()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        sel.register(self.listener, ("listen", None))
        sel.register(self.zsock, ("zygote", None))
        sel.register(wake_r, ("wake", None))
        try:
            # inside the try: a starter that died already (EPIPE on the ready pipe, a
            # closed stdout) still gets a full shutdown, socket and zygote included
            if announce:
                print(f"tvmrt monitor {os.getpid()} listening on {self.path}", flush=True)
            if ready_fd is not None:
                try:
                    os.write(ready_fd, b"ready\n")
                finally:
                    os.close(ready_fd)
            core = self.core
            timers = core.timers
            self._reserve = _open_reserve()
            while self.running:
                if timers:
                    d = core.next_deadline()
                    timeout = None if d is None else max(0.0, d - time.monotonic())
                else:
                    timeout = None              # the call path: no deadline pending
                if self._accept_paused:
                    wait = self._accept_paused - time.monotonic()
                    if wait <= 0:
                        self._resume_accept()
                    else:
                        timeout = wait if timeout is None else min(timeout, wait)
                for kind, peer, fileobj in sel.poll(timeout):
                    if kind == "peer":
                        self._sent_to = None
                        self._on_peer(peer, fileobj)
                        if self._sent_to is not None:
                            self._follow_on()
                    elif kind == "listen":
                        self._on_accept()
                    elif kind == "zygote":
                        self._on_zygote()
                    else:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                if timers:
                    d = core.next_deadline()
                    if d is not None and d <= time.monotonic():
                        self._apply(core.tick(time.monotonic()))
        finally:
            self._shutdown()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _announce_sandbox(self):
        """Make the monitor non-dumpable (the zygote and the enclaves inherit it through
        fork) unless the sandbox is off, and say in one line on stderr what is off or
        missing -- nothing when the sandbox is full."""
        if self.sandbox == "off":
            print("tvmrt monitor: --no-sandbox: the monitor, the zygote and every enclave "
                  "are dumpable, enclaves keep this process's capabilities and run without "
                  "no-new-privs, Landlock and seccomp: an enclave can read this uid's files "
                  "and other processes' memory", file=sys.stderr, flush=True)
            return
        _sandbox.set_dumpable(False)
        gaps = _sandbox.missing(self.support)
        if gaps:
            print(f"tvmrt monitor: enclave sandbox is {self.sandbox!r}: " + "; ".join(gaps),
                  file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame):
        self.running = False

    def stop(self):
        self.running = False

    # ------------------------------------------------------------------ events
    def _on_accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EMFILE / ENFILE / ENOBUFS / ENOMEM: refuse this one client, serve the rest
            self._refuse_pending(exc)
            return
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, 12)
            pid, uid, _gid = (int.from_bytes(cred[i:i + 4], sys.byteorder)
                              for i in (0, 4, 8))
            if uid not in self.allow_uids:
                _bye(conn, NotPermitted(f"this monitor serves uid {os.getuid()} only, "
                                        f"not uid {uid} (its owner may start it with "
                                        f"--allow-uid {uid})"))
                return
            wire.tune(conn)
            conn.setblocking(False)
        except OSError:
            conn.close()
            return
        peer, fx = self.core.host_connected(uid, pid)
        self.hosts.add(peer)
        self.socks[peer] = conn
        self.sel.register(conn, ("peer", peer))
        self._apply(fx)

    def _refuse_pending(self, exc: OSError) -> None:
        """``accept`` failed for want of a resource: give up the reserve fd to accept
        the waiting client and tell it why before closing it, so that the listener does
        not stay readable (epoll would spin) and the client gets a reason."""
        self._log(f"accept failed: {exc.strerror}; refusing a client")
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            # not even that: stop accepting for a moment rather than spin
            self._pause_accept()
        else:
            _bye(conn, ResourceExhausted(
                f"the monitor is out of resources ({exc.strerror}); try again later"))
        self._reserve = _open_reserve()

    def _pause_accept(self) -> None:
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            return
        self._accept_paused = time.monotonic() + _ACCEPT_PAUSE

    def _resume_accept(self) -> None:
        self._accept_paused = 0.0
        self.sel.register(self.listener, ("listen", None))

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

    def _follow_on(self):
        """Read the answer of the peer just sent to, before going back to epoll.

        On one CPU the receiver of a send runs at once (wakeup preemption) and has
        usually answered before ``send`` returns: reading its socket straight away
        saves an ``epoll_wait`` per message.  On several CPUs the answer is rarely
        there yet, so a score of recent hits decides whether to try (a miss costs one
        non-blocking recv); a chain is bounded so that other peers are not starved.
        """
        chain = _FOLLOW_CHAIN
        while chain:
            peer = self._sent_to
            if peer is None:
                return
            self._sent_to = None
            if self._hits <= 0:
                # cold: probe now and then, so a change of placement is noticed
                self._probe += 1
                if self._probe < _FOLLOW_PROBE:
                    return
                self._probe = 0
            sock = self.socks.get(peer)
            if sock is None or not self._on_peer(peer, sock):
                self._hits = max(self._hits - 2, 0)
                return
            self._hits = min(self._hits + 1, _FOLLOW_MAX)
            chain -= 1
        self._sent_to = None

    def _on_peer(self, peer, sock) -> bool:
        """Handle one message from ``peer``; False when none was waiting."""
        try:
            # Only hosts send fds (their stdio at create); an enclave's would be dropped.
            # wire.recv itself reads on past ECONNRESET (a dying peer's last frames are
            # still queued): what comes out here is EOF, garbage or a real error.
            if peer in self.hosts:
                msg, fds = self._rx.recv_checked(sock)
            else:
                msg, fds = self._rx.recv(sock)
        except BlockingIOError:
            return False
        except wire.FdsLost as exc:
            # out of fds ourselves: that one request is refused, the peer stays
            rid = exc.msg.get("rid") if exc.msg is not None else None
            if type(rid) is int and rid > 0:
                self._send(Send(peer, {"op": "e", "rid": rid, "c": exc.code,
                                       "why": exc.reason}, ()))
            else:
                self._cut_off(peer, exc)
            return True
        except (MonitorGone, ProtocolError, OSError) as exc:
            self._cut_off(peer, exc)
            return True
        self._fds = fds
        try:
            self._apply(self.core.message(peer, msg, len(fds), time.monotonic()))
        except Exception:
            self._internal_error(peer)
        finally:
            if fds:
                wire.close_all(fds)
                self._fds = []
        return True

    def _on_zygote(self):
        try:
            msg, fds = self._rx.recv(self.zsock, True)
        except BlockingIOError:
            return
        except Exception:
            self._log("the zygote went away; stopping")
            self.running = False
            return
        op, peer = msg.get("op"), msg.get("k")
        if op == "maps" and len(fds) == 1 and peer in self.socks and peer not in self.maps:
            self.maps[peer] = fds.pop()
        elif op == "warm":
            if not fds or (self.isolation == "strict") != (len(fds) == 2):
                # its fds were lost (this process is out of fds): the zygote kills it
                self._zsend({"op": "drop", "pid": msg.get("pid")})
            else:
                chan = socket.socket(fileno=fds.pop(0))
                mfd = fds.pop(0) if fds else None
                if len(self.warm) < zygote.POOL_SIZE:
                    self.warm.append((msg.get("pid"), chan, mfd))
                else:               # more than the zygote should keep: not ours to hold
                    self._drop_warm(msg.get("pid"), chan, mfd)
        wire.close_all(fds)
        if op == "spawned":
            self._apply(self.core.spawned(peer, msg.get("pid")))
        elif op == "spawn_failed":
            self._apply(self.core.spawn_failed(peer, msg.get("why", "?")))
        elif op == "exited":
            self._apply(self.core.exited(peer, msg.get("how", "?"), time.monotonic()))
        elif op == "signalled" and peer in self._stopping:
            stopping = self._stopping[peer]
            stopping[0] -= 1
            if not stopping[0]:                 # every stop asked for is delivered
                del self._stopping[peer]
                for eff in stopping[1]:
                    self._send(eff)             # in order, now that it is stopped

    # ------------------------------------------------------------------ effects
    def _apply(self, fx):
        core = self.core
        for eff in fx:
            t = type(eff)
            if t is Send:
                self._send(eff)
            elif t is NewSeg:
                why = self._new_seg(eff.seg, eff.size)
                # the result goes back to the core at once: it answers the request
                self._apply(core.segment_created(eff.seg) if why is None
                            else core.segment_failed(eff.seg, why))
            elif t is FreeSeg:
                shm = self.segs.pop(eff.seg, None)
                if shm is not None:
                    shm.close_fd()
            elif t is SplitSeg:
                why = self._split_seg(eff)
                self._apply(core.segment_created(eff.seg) if why is None
                            else core.segment_failed(eff.seg, why))
            elif t is Spawn:
                self._spawn(eff)
            elif t is Kill:
                self._zsend({"op": "kill", "k": eff.peer})
            elif t is Signal:
                # the zygote signals: the process is its child, so the pid is not reused.
                # A stop is acknowledged, and sends to the peer wait for it (_stopping).
                if eff.peer not in self.socks:
                    # cut off earlier in this batch (a violation found by one of its
                    # Verifies, performed in place): like a Send to it, dropped
                    continue
                if eff.sig == "stop":
                    self._stopping.setdefault(eff.peer, [0, []])[0] += 1
                    self._zsend({"op": "signal", "k": eff.peer, "sig": eff.sig, "ack": 1})
                else:
                    self._zsend({"op": "signal", "k": eff.peer, "sig": eff.sig})
            elif t is Close:
                self._drop_sock(eff.peer)
            elif t is Log:
                self._log(eff.text)
            elif t is Stats:
                eff.msg["monitor"] = self._stats()
            elif t is Verify:
                self._verify(eff)

    def _stats(self) -> dict:
        """This process's figures for ``ps`` (see :class:`Stats`)."""
        try:
            fds = len(os.listdir("/proc/self/fd")) - 1     # less listdir's own
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            fds = rss = -1
        return {"pid": os.getpid(), "fds": fds, "rss": rss, "segments": len(self.segs),
                "sockets": len(self.socks), "warm": len(self.warm)}

    def _send(self, eff):
        peer, msg, segs = eff
        sock = self.socks.get(peer)
        if sock is None:
            return
        stopping = self._stopping.get(peer)
        if stopping is not None:
            stopping[1].append(eff)
            return
        fds = [self.segs[s].fd for s in segs if s in self.segs] if segs else ()
        try:
            wire.send(sock, msg, fds)
            self._sent_to = peer
        except (MonitorGone, BlockingIOError, OSError) as exc:
            # a peer that is gone or does not read is cut off; nobody else notices
            self._log(f"peer {peer}: send failed ({exc.__class__.__name__}); disconnecting")
            self._drop_sock(peer)
            self._apply(self.core.disconnected(peer))

    def _verify(self, eff: Verify) -> None:
        """Strict mode: send ``eff.send`` unless a process of ``eff.checks`` still maps
        the segment named; the first that does goes to the core instead.

        Each process is looked at once for all its segments.  The receiver of the Send
        (a check naming ``send.peer``: it had the region before) is checked only over
        the address ranges its grants name (one PROCMAP_QUERY each, where the kernel
        has it): its runtime maps each region there (``MAP_FIXED``), which would
        replace -- hide -- a rogue mapping made at that address, while one made anywhere
        else stays and is found at the region's next grant, when this receiver is a
        past holder."""
        checks = eff.checks
        send = eff.send
        segs = self.segs
        if len(checks) == 1:
            peer, pid, seg = checks[0]
            shm = segs.get(seg)
            if shm is None:
                bad = None
            elif peer == send.peer:
                bad = self._maps_segments(peer, pid, ((seg, shm),), send.msg["g"])
            else:
                bad = self._maps_segments(peer, pid, ((seg, shm),))
        else:
            by_peer: dict[int, tuple[int, list]] = {}
            for peer, pid, seg in checks:
                shm = segs.get(seg)
                if shm is not None:
                    by_peer.setdefault(peer, (pid, []))[1].append((seg, shm))
            bad = None
            for peer, (pid, found) in by_peer.items():
                if peer == send.peer:
                    bad = self._maps_segments(peer, pid, found, send.msg["g"])
                else:
                    bad = self._maps_segments(peer, pid, found)
                if bad is not None:
                    break
        if bad is not None:
            self._apply(self.core.isolation_violation(bad[0], bad[1], eff))
            return
        self._send(send)

    def _maps_segments(self, peer: int, pid: int, segs, grants=None
                       ) -> tuple[int, int] | None:
        """Does process ``pid`` (of ``peer``) map one of ``segs`` (``(seg, _SegFd)``),
        with any protection?  ``(peer, seg)`` of the first it maps, else None.  A strict
        holder that gave a region up keeps no mapping at all: even a PROT_NONE one could
        be mprotect'ed back.  With ``grants`` (the receiver's check, :meth:`_verify`),
        only over the address range each segment's grant names.

        Goes through the fd of ``/proc/PID/maps`` the enclave passed at birth (a host's
        is opened by path: hosts are dumpable).  With PROCMAP_QUERY (:func:`_pmq_find`)
        each file-backed mapping is compared with the segment file's inode and device;
        without it (before Linux 6.11) the whole maps text is read and each segment's
        unique name (``/memfd:tvmrt.<monitor pid>.<seg>.<random>``: the kernel prints the
        file's name in every mapping of it, including ones made from a dup of its fd)
        looked for with ``bytes.find``.  A process that is gone maps nothing; a maps
        file that cannot be read at all is a violation (a holder that cannot be checked
        is not trusted)."""
        fd = self.maps.get(peer)
        opened = -1
        try:
            if fd is None:
                # a host (dumpable), or an enclave whose maps fd has not come yet: by path
                opened = fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
            if self._pmq:
                try:
                    if grants is None:
                        idents = {shm.ident(): seg for seg, shm in segs}
                        hit = _pmq_find(fd, 0, _ADDR_END, idents)
                        return None if hit is None else (peer, idents[hit])
                    for seg, shm in segs:
                        ident = {shm.ident()}
                        for x in grants:
                            if x[0] == seg and _pmq_find(fd, x[1], x[1] + x[2], ident):
                                return peer, seg
                    return None
                except OSError as exc:
                    if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._pmq = False       # before Linux 6.11: the text from now on
            n = _read_maps(fd)
        except (ProcessLookupError, FileNotFoundError):
            return None
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return None                 # its memory is gone
            self._log(f"peer {peer}: cannot read its maps ({exc}): treated as a violation")
            return peer, segs[0][0]
        finally:
            if opened >= 0:
                os.close(opened)
        find = _MAPS_BUF.find
        for seg, shm in segs:
            if find(shm.needle, 0, n) >= 0:
                return peer, seg
        return None

    def _split_seg(self, eff) -> str | None:
        """A second handle (a dup of its fd) on the file of segment ``eff.parent`` for
        the split region ``eff.seg``; None, or why it could not be made."""
        shm = self.segs.get(eff.parent)
        if shm is None:
            return "the segment to split is gone"
        try:
            fd = os.dup(shm.fd)
        except OSError as exc:
            self._log(f"cannot split a segment: {exc}")
            return f"{exc.__class__.__name__}: {exc}"
        self.segs[eff.seg] = _SegFd(fd, shm.name)
        return None

    def _new_seg(self, seg, size) -> str | None:
        """Create segment ``seg``; None, or why it could not be created.

        A memfd, sealed at its size (``F_SEAL_SHRINK | F_SEAL_GROW``) and against
        further seals (``F_SEAL_SEAL``): whoever gets its fd -- every holder does, and a
        hostile eapp keeps a dup of it by wrapping the runtime before the grant -- can
        neither truncate it (the current holder would die of SIGBUS at its next touch,
        which no check at the next handoff can prevent) nor grow it, nor add a seal that
        would stop the next holder from mapping it writable.  Only a memfd takes seals
        (a POSIX shm file is born with ``F_SEAL_SEAL``).  It has no path to unlink: its
        name (``tvmrt.<monitor pid>.<seg>.<random>``) only labels it in
        ``/proc/PID/maps`` as ``/memfd:<name> (deleted)``, which is what strict mode's
        check looks for."""
        name = f"{self._seg_prefix}{seg:x}.{secrets.token_hex(8)}"
        try:
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            try:
                # not executable, and sealed so (a system with vm.memfd_noexec = 2
                # refuses any other memfd)
                fd = os.memfd_create(name, flags | _MFD_NOEXEC_SEAL)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                fd = os.memfd_create(name, flags)      # a kernel before 6.3
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            except BaseException:
                os.close(fd)
                raise
        except Exception as exc:
            self._log(f"cannot create a segment of {size} bytes: {exc}")
            return f"{exc.__class__.__name__}: {exc}"
        self.segs[seg] = _SegFd(fd, f"/memfd:{name}")
        return None

    def _spawn(self, eff):
        """Make a warm process the enclave of ``eff`` (see :meth:`_become`), or, when
        none is left, have the zygote start one for it; without the fds for its socket
        pair the create is refused (ResourceExhausted) and nothing is left."""
        peer, spec, shm_seg, stdio = eff
        if _trace.FD is not None:
            _trace.mark("m_spawn")
        while self.warm:
            w = self.warm.popleft()
            done = self._become(w, peer, spec, shm_seg, stdio)
            if done:
                return
            if done is None:
                # out of fds: not the warm process's fault; kept for the next create,
                # and the zygote's way below refuses this one (ResourceExhausted)
                self.warm.appendleft(w)
                break
        mine = theirs = None
        null = None
        try:
            mine, theirs = wire.seqpacket_pair()
            fds, null = self._birth_fds(stdio, shm_seg)
        except OSError as exc:
            for sk in (mine, theirs):
                if sk is not None:
                    sk.close()
            self._apply(self.core.spawn_failed(peer, exc.strerror or str(exc),
                                               exhausted=True))
            return
        self._adopt(peer, mine)
        try:
            self._zsend({"op": "spawn", "k": peer, "spec": spec}, [theirs.fileno(), *fds])
        finally:
            theirs.close()
            if null is not None:
                os.close(null)

    def _birth_fds(self, stdio, shm_seg) -> tuple[list[int], int | None]:
        """What a new enclave gets besides its channel: its host's stdout and stderr
        (those that came with the create) or ``/dev/null`` twice, then the shm segment;
        and the ``/dev/null`` fd to close once they are sent (or None).  OSError when
        ``/dev/null`` cannot be opened (out of fds)."""
        null = None
        if stdio == "message" and len(self._fds) >= 2:
            fds = self._fds[:2]
        else:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            fds = [null, null]
        if shm_seg is not None and shm_seg in self.segs:
            fds.append(self.segs[shm_seg].fd)
        return fds, null

    def _adopt(self, peer, sock) -> None:
        """``sock`` is enclave ``peer``'s channel from now on."""
        sock.setblocking(False)
        self.socks[peer] = sock
        self.sel.register(sock, ("peer", peer))

    def _become(self, w, peer, spec, shm_seg, stdio) -> bool | None:
        """Send warm process ``w`` its spec and fds (:meth:`_birth_fds`): its channel is
        the enclave's from now on, and the zygote is told whose process it is.  True
        when done; False when the process is gone (dropped); None when this monitor is
        out of fds (``w`` is not used, nor dropped)."""
        pid, chan, mfd = w
        try:
            fds, null = self._birth_fds(stdio, shm_seg)
        except OSError:
            return None
        try:
            wire.send(chan, {"op": "become", "k": peer, "spec": spec}, fds)
        except (MonitorGone, OSError):
            self._drop_warm(pid, chan, mfd)
            return False
        finally:
            if null is not None:
                os.close(null)
        if _trace.FD is not None:
            _trace.mark("m_sent")
        self._adopt(peer, chan)
        if mfd is not None:
            self.maps[peer] = mfd
        self._zsend({"op": "assigned", "k": peer, "pid": pid})
        self._apply(self.core.spawned(peer, pid))
        return True

    def _drop_warm(self, pid, chan, mfd) -> None:
        """Give warm process ``pid`` up: close what this monitor holds of it, and have
        the zygote kill it."""
        _close_warm(chan, mfd)
        self._zsend({"op": "drop", "pid": pid})

    def _zsend(self, msg, fds=()):
        try:
            wire.send(self.zsock, msg, fds)
        except Exception:
            self._log("the zygote went away; stopping")
            self.running = False

    def _drop_sock(self, peer):
        self._stopping.pop(peer, None)
        fd = self.maps.pop(peer, None)
        if fd is not None:
            os.close(fd)
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
        for fd in self.maps.values():
            os.close(fd)
        self.maps.clear()
        while self.warm:
            _close_warm(*self.warm.popleft()[1:])
        for shm in self.segs.values():
            shm.close_fd()
        self.segs.clear()
        try:
            self.listener.close()
            # only the socket this monitor bound: not one that replaced it meanwhile
            if _identity(self.path) == self._sock_id:
                os.unlink(self.path)
        except OSError:
            pass
        self._remove_made_dir()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
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


class _SegFd:
    """The monitor's fd of a segment (a sealed memfd, or a dup of one for a split
    region's half) and the name its mappings show in ``/proc/PID/maps``."""
    __slots__ = ("fd", "name", "needle", "_ident")

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name        # the file's (a split half shares its first half's)
        self.needle = name.encode()
        self._ident: tuple[int, int] | None = None

    def ident(self) -> tuple[int, int]:
        """The file's (inode, device) as PROCMAP_QUERY reports a mapping of it (device
        major | minor << 32; an fstat at the first strict check that needs it)."""
        i = self._ident
        if i is None:
            st = os.fstat(self.fd)
            i = self._ident = (st.st_ino, os.major(st.st_dev) | os.minor(st.st_dev) << 32)
        return i

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
