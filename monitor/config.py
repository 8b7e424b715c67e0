"""The monitor core's configuration: one frozen object, given to :class:`Core` at construction.

There is no default attestation key: a :class:`Config` needs one (the daemon draws 32
random bytes, or ``tvmrt monitor --key FILE`` loads them; tests pass their own).  Every
other field has the production default.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tvmrt._layout import ARENAS, PAGE

#: the transfer modes: the default first
ISOLATION_MODES = ("mprotect", "strict")


@dataclass(frozen=True)
class Config:
    """Everything the core needs to know that is not an event."""

    #: the monitor's Ed25519 private key, its 32-byte seed (no default): it signs
    #: attestation reports and is the input key of ``get_key`` (tvmrt/_attest.py)
    key: bytes
    #: page size: region sizes, offsets and addresses are multiples of it
    page: int = PAGE
    #: arena name -> (base address, size); "mmap", "relay" and "shm" are used
    arenas: Mapping[str, tuple[int, int]] = field(default_factory=lambda: dict(ARENAS))
    #: region quota of a host process (across its connections) and of each enclave:
    #: count and bytes
    max_regions: int = 1024
    max_bytes: int = 8 << 30
    #: largest single region
    max_region: int = 4 << 30
    #: enclaves one host process (across its connections) may have at once
    max_enclaves: int = 1024
    #: enclaves the whole monitor may have at once (a hard cap across hosts)
    max_enclaves_total: int = 4096
    #: instances (processes) one server may have
    max_instances: int = 64
    #: calls one enclave may have outstanding at once (its threads), and callers one
    #: server may have queued
    max_calls_out: int = 64
    max_queue: int = 1024
    #: deadline of a queued call that gave none (seconds)
    queue_timeout: float = 60.0
    #: deadline of a create that gave none: the enclave must be ``ready`` by then
    create_timeout: float = 30.0
    #: after an enclave process was reaped, how long to wait for EOF on its socket
    eof_grace: float = 1.0
    #: tombstones kept per host (the oldest is dropped beyond this)
    max_tombstones: int = 4096
    #: largest eapp code accepted by create (bytes)
    max_code: int = 1 << 20
    #: the sandbox every enclave process enters, as the shell found it on this kernel
    #: (:func:`tvmrt._sandbox.level`: "full", "landlock-fs+seccomp", ..., "off"); the
    #: core only records it per enclave, for ``ps``
    sandbox: str = "off"
    #: transfer mode of relay regions (DESIGN.md §2): "mprotect" (the default: a
    #: process keeps its mapping, revoke = PROT_NONE) or "strict" (``remap``: revoke
    #: unmaps, every grant sends the fd again, and before each grant the shell
    #: confirms from /proc/PID/maps that no earlier holder still maps the segment)
    isolation: str = "mprotect"

    def __post_init__(self) -> None:
        if type(self.key) is not bytes or len(self.key) != 32:
            raise ValueError("Config.key must be 32 random bytes (an Ed25519 seed)")
        if self.page <= 0 or self.page & (self.page - 1):
            raise ValueError("Config.page must be a power of two")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"Config.isolation must be one of {ISOLATION_MODES}")
        for name in ("mmap", "relay", "shm"):
            if name not in self.arenas:
                raise ValueError(f"Config.arenas lacks the {name!r} arena")
