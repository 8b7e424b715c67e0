"""The monitor's key file (``tvmrt monitor --key FILE``): load it, or create it once.

The file is the monitor's Ed25519 private key as unencrypted PKCS#8 PEM (``-----BEGIN
PRIVATE KEY-----``, what ``openssl genpkey -algorithm ed25519`` writes), mode 0600.  Its
32-byte seed becomes :attr:`Config.key`: it signs every report and is the input key of
``get_key``, so reports stay verifiable and derived keys stay the same across restarts.

This is the I/O half of attestation (the core only computes); every refusal is one
:class:`~tvmrt.errors.InvalidArgument` line that says what to do.
"""
from __future__ import annotations

import os
import stat
import tempfile

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from tvmrt.errors import InvalidArgument

#: a PEM Ed25519 key is ~120 bytes: anything much larger is not one
_MAX_SIZE = 64 << 10


def _seed(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(seed: bytes) -> bytes:
    """The raw 32-byte public key of a 32-byte seed."""
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def load_key(path: str) -> bytes:
    """The 32-byte seed in key file ``path``; InvalidArgument if it cannot be used.

    Refused: a file that cannot be read, is not a regular file, belongs to another user,
    can be read or written by group or others (like ssh, a private key must be 0600 or
    stricter), or is not an unencrypted PEM Ed25519 private key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidArgument(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"key file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise InvalidArgument(f"key file {path} belongs to uid {st.st_uid}, not to "
                                  f"this user")
        if st.st_mode & 0o077:
            raise InvalidArgument(f"key file {path} is too open (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, _MAX_SIZE + 1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_SIZE:
        raise InvalidArgument(f"key file {path} is not a PEM Ed25519 private key "
                              f"(too large)")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidArgument(f"key file {path} is encrypted: the monitor needs an "
                              f"unencrypted PEM Ed25519 private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(f"key file {path} is not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"key file {path} holds a {type(key).__name__.lstrip('_')}, "
                              f"not an Ed25519 private key")
    return _seed(key)


def load_or_create_key(path: str) -> bytes:
    """The seed in ``path``, made first if there is no file there.

    A new key is written to a private temporary file in the same directory and linked
    into place: the file appears whole and 0600 or not at all, and of two monitors
    creating the same file at once one links and the other loads what it linked."""
    if not os.path.lexists(path):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        d = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tvmrt-key-", dir=d)   # 0600
        except OSError as exc:
            raise InvalidArgument(f"cannot create key file {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass                        # made meanwhile by another: load theirs
        except OSError as exc:
            raise InvalidArgument(f"cannot create key file {path}: {exc.strerror}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return load_key(path)
