"""The effects the monitor core returns and the I/O shell performs.

Each effect is a small ``NamedTuple`` (cheap to build on the hot path); the shell
dispatches on ``type(effect)``.  :data:`ALL` lists every class.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class Send(NamedTuple):
    """Send ``msg`` to ``peer`` with the fds of segments ``segs`` (in that order).

    Before a message with grants goes, the shell checks each granted segment's size
    and reports a resized one with :meth:`Core.segment_tampered` instead of sending.
    """
    peer: int
    msg: dict[str, Any]
    segs: Sequence[int]


class Spawn(NamedTuple):
    """Start the enclave process of ``peer`` (its socket end is the shell's to make).

    ``stdio`` is ``"message"`` (the two fds that came with the message being handled
    are its stdout and stderr) or ``"null"`` (the shell opens ``/dev/null`` for both).
    ``shm_seg`` is the segment of its shared-memory window, or None.
    """
    peer: int
    spec: dict[str, Any]
    shm_seg: int | None
    stdio: str


class Kill(NamedTuple):
    """Make sure the enclave process of ``peer`` is dead (the zygote reports its exit)."""
    peer: int


class Signal(NamedTuple):
    """Stop (``sig`` ``"stop"``: SIGSTOP) or continue (``"cont"``: SIGCONT) the enclave
    process of ``peer`` and its process group (through the zygote, whose child it is:
    its pid cannot have been reused).  Nothing is reported back."""
    peer: int
    sig: str


class Close(NamedTuple):
    """Close ``peer``'s socket; the core sends it nothing more."""
    peer: int


class NewSeg(NamedTuple):
    """Create segment ``seg`` of ``size`` bytes for the ``arena`` arena, then report the
    result at once: :meth:`Core.segment_created` or :meth:`Core.segment_failed`."""
    seg: int
    size: int
    arena: str


class FreeSeg(NamedTuple):
    """Close the monitor's fd of segment ``seg``."""
    seg: int


class SplitSeg(NamedTuple):
    """Segment ``seg`` is a second handle on the file of segment ``parent`` (a split
    region's second half, which starts inside that file): dup its fd, then report
    :meth:`Core.segment_created` or :meth:`Core.segment_failed` at once.  Grants of
    either segment are checked against the file's ``size``, not the region's."""
    seg: int
    parent: int
    size: int


class Log(NamedTuple):
    """A line for the monitor's log."""
    text: str


class Stats(NamedTuple):
    """Put the monitor process's own figures into ``msg["monitor"]`` (``pid``, ``fds``,
    ``rss`` in bytes, ``segments``, ``sockets``; -1 for a figure it cannot read, e.g.
    ``fds`` when it has no fd left to open ``/proc/self/fd``) before the ``Send`` of ``msg`` that
    follows.  The core cannot know them (no syscalls), and a host cannot read them itself
    when the monitor is non-dumpable and the host is not root: its ``/proc`` is root's."""
    msg: dict[str, Any]


class Verify(NamedTuple):
    """Strict mode: perform ``send`` only after confirming, for every ``(peer, pid, seg)``
    of ``checks``, that the process of ``peer`` (``pid``) maps no part of segment ``seg``
    (its ``/proc/PID/maps`` has no line naming the segment).  The first check that fails
    is reported with :meth:`Core.isolation_violation` instead of sending; a process
    already gone passes (it maps nothing)."""
    checks: tuple[tuple[int, int, int], ...]
    send: Send
    #: the core's own: what emitting ``send`` recorded (the receiver's new segments,
    #: the segments it became a mapper of), undone if a check fails
    undo: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


ALL = (Send, Spawn, Kill, Signal, Close, NewSeg, FreeSeg, SplitSeg, Log, Stats, Verify)
