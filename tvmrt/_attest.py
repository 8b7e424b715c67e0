"""Attestation: measurements, signed reports, their JSON form, verification, derived keys.

Pure computation (no files, no sockets, no clock): the monitor's core signs and derives
with it, and anyone holding a report checks it with :func:`verify_report` -- the same
byte layouts on both sides, defined once here.

**Measurement** of an enclave (what it is, fixed at ``create``): SHA-256 over ::

    b"tvmrt-eapp-v1\\0"      14 bytes, domain separation
    type                     1 byte: 0 normal, 1 server
    name                     its UTF-8 bytes (1..15, no NUL)
    b"\\0"                   1 byte, ends the name
    code                     the exact eapp bytes the monitor read and handed the enclave

**Report**: a dict (its JSON form: :func:`report_to_json`) ::

    measurement  bytes[32]   the enclave's measurement, as above
    nonce        int         u64, chosen by who asks (freshness)
    name         str         the enclave's name
    type         int         0 normal, 1 server
    public_key   bytes[32]   the monitor's Ed25519 public key (raw)
    sig          bytes[64]   Ed25519 signature by that key over :func:`signed_bytes`

**Signed bytes** (``tvmrt-report-v1``)::

    offset  size
    0       16    b"tvmrt-report-v1\\0"   domain separation
    16      32    measurement
    48      8     nonce, u64 little-endian (Penglai's byte order for the nonce)
    56      1     type
    57      1     n = length of the name's UTF-8 bytes (1..15)
    58      n     name, UTF-8

Ed25519 binds the public key into every signature itself, so the key is not repeated.

**Derived keys** (``get_key``): HKDF-SHA256 with input key material = the monitor's
32-byte Ed25519 private key seed, salt = the enclave's measurement, info =
``b"tvmrt-get-key-v1\\0"`` + one type byte (0 ENCLAVE_KEY, 1 STORAGE_KEY), ``size``
bytes (1..8160, HKDF's limit).  The same measurement gets the same key from a monitor
with the same key file; another measurement, another type or another monitor key gets
an unrelated key.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import (
    BadSignature,
    MalformedReport,
    MeasurementMismatch,
    NonceMismatch,
    WrongKey,
)

NORMAL = 0
SERVER = 1
#: longest enclave name, in UTF-8 bytes (Penglai's NAME_LEN 16 with its NUL)
NAME_MAX = 15
U64 = (1 << 64) - 1

MEASURE_PREFIX = b"tvmrt-eapp-v1\0"
REPORT_PREFIX = b"tvmrt-report-v1\0"
KEY_PREFIX = b"tvmrt-get-key-v1\0"
#: the ``format`` field of a report's JSON form
REPORT_FORMAT = "tvmrt-report-v1"

#: get_key types (Penglai's numbering); Penglai's ATTEST_KEY (2) is refused
ENCLAVE_KEY = 0
STORAGE_KEY = 1
#: HKDF-SHA256 yields at most 255 blocks of 32 bytes
KEY_MAX = 255 * 32

#: the fields of a report and their kinds
_FIELDS = ("measurement", "nonce", "name", "type", "public_key", "sig")
_BYTES = {"measurement": 32, "public_key": 32, "sig": 64}


def measure(etype: int, name: str, code: bytes) -> bytes:
    """An enclave's measurement: SHA-256 over the layout in the module docstring."""
    h = hashlib.sha256(MEASURE_PREFIX)
    h.update(bytes([etype]))
    h.update(name.encode() + b"\0")
    h.update(code)
    return h.digest()


def signed_bytes(measurement: bytes, nonce: int, etype: int, name: str) -> bytes:
    """The exact bytes a report's signature covers (layout in the module docstring)."""
    raw = name.encode()
    return (REPORT_PREFIX + measurement + nonce.to_bytes(8, "little") + bytes([etype])
            + bytes([len(raw)]) + raw)


class Signer:
    """The monitor's side: a report signer and key deriver for one 32-byte seed.

    ``seed`` is the Ed25519 private key (RFC 8032's 32 secret bytes).  Construction and
    every method are computation only: the pure core holds one."""

    __slots__ = ("_seed", "_key", "public_key")

    def __init__(self, seed: bytes):
        if type(seed) is not bytes or len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        self._seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        #: the raw 32-byte public key every report carries
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def report(self, measurement: bytes, nonce: int, etype: int, name: str) -> dict:
        """A signed report (fields in the module docstring)."""
        sig = self._key.sign(signed_bytes(measurement, nonce, etype, name))
        return {"measurement": measurement, "nonce": nonce, "name": name, "type": etype,
                "public_key": self.public_key, "sig": sig}

    def derive_key(self, measurement: bytes, key_type: int, size: int) -> bytes:
        """``get_key``: ``size`` bytes for ``measurement`` and ``key_type`` (see above)."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=size, salt=measurement,
                    info=KEY_PREFIX + bytes([key_type]))
        return hkdf.derive(self._seed)


# ---------------------------------------------------------------- checking a report
def _check_fields(report) -> None:
    """MalformedReport unless ``report`` has every field with the right type and size."""
    if not isinstance(report, dict):
        raise MalformedReport(f"a report is a dict, not {type(report).__name__}")
    for f in _FIELDS:
        if f not in report:
            raise MalformedReport(f"the report has no {f!r} field")
    for f, n in _BYTES.items():
        v = report[f]
        if type(v) is not bytes or len(v) != n:
            raise MalformedReport(f"the report's {f!r} must be {n} bytes")
    nonce = report["nonce"]
    if type(nonce) is not int or not 0 <= nonce <= U64:
        raise MalformedReport("the report's 'nonce' must be an integer 0 .. 2**64-1")
    if report["type"] not in (NORMAL, SERVER) or type(report["type"]) is not int:
        raise MalformedReport("the report's 'type' must be 0 (normal) or 1 (server)")
    name = report["name"]
    if (type(name) is not str or not name or "\0" in name
            or len(name.encode("utf-8", "replace")) > NAME_MAX):
        raise MalformedReport(f"the report's 'name' must be 1..{NAME_MAX} bytes, no NUL")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise MalformedReport("the report's 'name' is not valid Unicode") from None


def _bytes32(value, what: str) -> bytes:
    """32 raw bytes from bytes or hex text; ValueError naming ``what`` otherwise."""
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{what} in hex is 64 hex digits") from None
    if type(value) is not bytes or len(value) != 32:
        raise ValueError(f"{what} is 32 bytes (64 hex digits)")
    return value


def _key_bytes(key) -> bytes:
    """Raw 32 bytes of a public key given as bytes, hex text or an Ed25519PublicKey."""
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _bytes32(key, "an Ed25519 public key")


def _measurement_bytes(m) -> bytes:
    return _bytes32(m, "a measurement")


def verify_report(report: dict, measurement: bytes | str | None = None,
                  key: bytes | str | Ed25519PublicKey | None = None,
                  nonce: int | None = None) -> dict:
    """Check an attestation report; returns it, or raises why it does not verify.

    ``report`` is the dict :meth:`tvmrt.host.Enclave.attest`, ``PLenclave_attest`` or an
    eapp's ``get_report`` gives (or :func:`report_from_json` reads).  Checks, in order:

    1. every field is there with its type and size, else :class:`MalformedReport`;
    2. ``key`` given (raw 32 bytes, 64 hex digits or an ``Ed25519PublicKey``): the
       report's ``public_key`` is that key, else :class:`WrongKey`;
    3. ``sig`` is a valid Ed25519 signature by ``public_key`` over the signed bytes
       (module docstring), else :class:`BadSignature` -- any changed signed field,
       signature or public key ends here;
    4. ``measurement`` given (32 bytes or hex): it equals the report's, else
       :class:`MeasurementMismatch`;
    5. ``nonce`` given: it equals the report's, else :class:`NonceMismatch`.

    Without ``key`` the report is checked against the key it carries: that proves it
    is intact, not who signed it.  Pin the monitor's key (``tvmrt pubkey FILE``) for
    that.  Bad arguments (not a key, not a measurement) raise ``ValueError``.
    """
    want_key = None if key is None else _key_bytes(key)
    want_m = None if measurement is None else _measurement_bytes(measurement)
    if nonce is not None and (type(nonce) is not int or not 0 <= nonce <= U64):
        raise ValueError("nonce must be an integer 0 .. 2**64-1")
    _check_fields(report)
    if want_key is not None and not hmac.compare_digest(report["public_key"], want_key):
        raise WrongKey(f"signed by key {report['public_key'].hex()}, "
                       f"not by the expected {want_key.hex()}")
    try:
        pub = Ed25519PublicKey.from_public_bytes(report["public_key"])
        pub.verify(report["sig"], signed_bytes(report["measurement"], report["nonce"],
                                               report["type"], report["name"]))
    except (InvalidSignature, ValueError):
        raise BadSignature("the signature does not match the report's fields and "
                           "public key (the report was changed or forged)") from None
    if want_m is not None and report["measurement"] != want_m:
        raise MeasurementMismatch(f"measurement {report['measurement'].hex()} is not the "
                                  f"expected {want_m.hex()}")
    if nonce is not None and report["nonce"] != nonce:
        raise NonceMismatch(f"nonce {report['nonce']} is not the expected {nonce}")
    return report


# ---------------------------------------------------------------- JSON form
def report_to_json(report: dict) -> str:
    """A report as one line of JSON: the dict's fields with bytes as lowercase hex,
    plus ``"format": "tvmrt-report-v1"``::

        {"format": "tvmrt-report-v1", "name": "test-caller", "type": 0,
         "measurement": "<64 hex>", "nonce": 1234, "public_key": "<64 hex>",
         "sig": "<128 hex>"}

    MalformedReport if ``report`` is not a report."""
    _check_fields(report)
    out: dict = {"format": REPORT_FORMAT}
    for f in _FIELDS:
        v = report[f]
        out[f] = v.hex() if isinstance(v, bytes) else v
    return json.dumps(out)


def report_from_json(text: str | bytes) -> dict:
    """The report dict of :func:`report_to_json`'s text; MalformedReport if it is not
    one (not JSON, another format, a field missing, not hex, a wrong size)."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReport(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedReport("a report's JSON is an object")
    if obj.get("format") != REPORT_FORMAT:
        raise MalformedReport(f"format must be {REPORT_FORMAT!r}, not {obj.get('format')!r}")
    rep = {}
    for f in _FIELDS:
        if f not in obj:
            raise MalformedReport(f"the report has no {f!r} field")
        v = obj[f]
        if f in _BYTES:
            if not isinstance(v, str):
                raise MalformedReport(f"the report's {f!r} must be hex text")
            try:
                v = bytes.fromhex(v)
            except ValueError:
                raise MalformedReport(f"the report's {f!r} is not hex") from None
        rep[f] = v
    extra = set(obj) - set(_FIELDS) - {"format"}
    if extra:
        raise MalformedReport(f"unknown report fields: {', '.join(sorted(extra))}")
    _check_fields(rep)
    return rep
