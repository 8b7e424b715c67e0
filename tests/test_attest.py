"""Attestation anyone can verify: Ed25519 reports over documented bytes, measurements,
``tvmrt verify`` and its reasons, the monitor's key file, ``get_key``.

The layouts are re-computed here from their documentation (tvmrt/_attest.py), not with
tvmrt's own helpers, so a change of layout fails these tests."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

import tvmrt
from conftest import eapp
from tvmrt import NORMAL, SERVER, errors as E
from tvmrt._embedded import EmbeddedMonitor
from tvmrt.host import Host
from tvmrt.monitor.keyfile import load_key, load_or_create_key

pytestmark = pytest.mark.timeout(120)

BUNDLED = Path(tvmrt.__file__).parents[1] / "eapps"


def expected_measurement(etype: int, name: str, code: bytes) -> bytes:
    """SHA-256 over b"tvmrt-eapp-v1\\0", type byte, name, NUL, code (the documented layout)."""
    return hashlib.sha256(b"tvmrt-eapp-v1\0" + bytes([etype]) + name.encode() + b"\0"
                          + code).digest()


def signed(measurement: bytes, nonce: int, etype: int, name: str) -> bytes:
    """The documented signed bytes of a report."""
    n = name.encode()
    return (b"tvmrt-report-v1\0" + measurement + nonce.to_bytes(8, "little")
            + bytes([etype, len(n)]) + n)


def raw_public(key) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def other_key() -> bytes:
    return raw_public(Ed25519PrivateKey.generate().public_key())


def flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


def tvmrt_cmd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tvmrt", *args], capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def real(monitor):
    """One real report (nonce 1234) of a normal enclave, and its code."""
    code = Path(eapp("echo_server")).read_bytes()
    with Host.connect(monitor.path, embedded=False) as h:
        enc = h.create(code, name="att-normal")
        rep = enc.attest(1234)
        assert enc.measurement == rep["measurement"]
        enc.destroy()
    return rep, code


def _run_keys(host, name="att-keys") -> dict:
    """Run tests/eapps/keys.py as ``name``; what it wrote."""
    shm = host.shmget(0x8000)
    enc = host.create(eapp("keys"), name=name, shm=shm)
    assert enc.run() == 0
    v = shm.view
    n = int.from_bytes(v[:4], "little")
    out = json.loads(bytes(v[4:4 + n]))
    shm.remove()
    return out


# ---------------------------------------------------------------- reports
def test_report_is_ed25519_over_the_documented_bytes(real):
    rep, code = real
    assert set(rep) == {"measurement", "nonce", "name", "type", "public_key", "sig"}
    m = expected_measurement(NORMAL, "att-normal", code)
    assert rep["measurement"] == m
    assert (rep["nonce"], rep["name"], rep["type"]) == (1234, "att-normal", NORMAL)
    assert len(rep["sig"]) == 64 and len(rep["public_key"]) == 32
    # checked with the library directly: raises InvalidSignature if it does not verify
    Ed25519PublicKey.from_public_bytes(rep["public_key"]).verify(
        rep["sig"], signed(m, 1234, NORMAL, "att-normal"))
    assert tvmrt.verify_report(rep, measurement=m, key=rep["public_key"], nonce=1234) is rep
    assert tvmrt.verify_report(rep, measurement=m.hex(), key=rep["public_key"].hex())
    assert tvmrt.measure(NORMAL, "att-normal", code) == m
    text = tvmrt.report_to_json(rep)
    assert json.loads(text)["format"] == "tvmrt-report-v1"
    assert tvmrt.report_from_json(text) == rep


def test_servers_and_running_enclaves_attest(host):
    """Any live enclave can be attested (Penglai: only FRESH or STOPPED, no server): the
    report is of the measurement taken at create, the same in every state."""
    code = Path(eapp("echo_server")).read_bytes()
    srv = host.create(code, name="att-srv", type=SERVER, instances=2)
    a, b = srv.attest(5), srv.attest(5)
    assert a == b                       # nothing re-measured, Ed25519 is deterministic
    assert a["type"] == SERVER
    tvmrt.verify_report(a, measurement=expected_measurement(SERVER, "att-srv", code),
                        nonce=5)
    assert srv.attest(6)["sig"] != a["sig"]
    assert host.ps()["public_key"] == a["public_key"]


PEER = other_key()
TAMPER = {
    "measurement": lambda r: {**r, "measurement": flip(r["measurement"])},
    "nonce": lambda r: {**r, "nonce": r["nonce"] + 1},
    "name": lambda r: {**r, "name": "att-normam"},
    "type": lambda r: {**r, "type": SERVER},
    "sig": lambda r: {**r, "sig": flip(r["sig"])},
    "sig-end": lambda r: {**r, "sig": r["sig"][:-1] + bytes([r["sig"][-1] ^ 0x80])},
    "public_key": lambda r: {**r, "public_key": PEER},
    "public_key-garbage": lambda r: {**r, "public_key": b"\xff" * 32},
}


@pytest.mark.parametrize("field", TAMPER)
def test_tampering_with_any_field_fails(real, field):
    rep, _ = real
    bad = TAMPER[field](rep)
    assert bad != rep
    with pytest.raises(E.BadSignature):
        tvmrt.verify_report(bad)
    # with the monitor's key pinned, a replaced key is the wrong key, anything else a
    # bad signature
    pinned = E.WrongKey if field.startswith("public_key") else E.BadSignature
    with pytest.raises(pinned):
        tvmrt.verify_report(bad, measurement=rep["measurement"], key=rep["public_key"])
    # and through JSON too
    with pytest.raises(pinned):
        tvmrt.verify_report(tvmrt.report_from_json(tvmrt.report_to_json(bad)),
                            key=rep["public_key"])


def test_wrong_key_measurement_and_nonce(real):
    rep, code = real
    with pytest.raises(E.WrongKey):
        tvmrt.verify_report(rep, key=PEER)
    with pytest.raises(E.MeasurementMismatch):
        tvmrt.verify_report(rep, measurement=expected_measurement(NORMAL, "att-other", code))
    with pytest.raises(E.MeasurementMismatch):
        tvmrt.verify_report(rep, measurement=expected_measurement(SERVER, "att-normal", code))
    with pytest.raises(E.NonceMismatch):
        tvmrt.verify_report(rep, key=rep["public_key"], nonce=1235)
    for exc in (E.WrongKey, E.BadSignature, E.MeasurementMismatch, E.NonceMismatch,
                E.MalformedReport):
        assert issubclass(exc, E.VerifyError) and issubclass(exc, ValueError)
    # arguments that are not a key or a measurement are the caller's mistake
    for kw in ({"key": "xyz"}, {"key": b"short"}, {"measurement": "00"}, {"nonce": -1}):
        with pytest.raises(ValueError) as ei:
            tvmrt.verify_report(rep, **kw)
        assert not isinstance(ei.value, E.VerifyError)


MALFORMED = [
    lambda r: {k: v for k, v in r.items() if k != "sig"},
    lambda r: {**r, "sig": r["sig"][:63]},
    lambda r: {**r, "measurement": r["measurement"].hex()},
    lambda r: {**r, "public_key": bytearray(r["public_key"])},
    lambda r: {**r, "nonce": -1},
    lambda r: {**r, "nonce": 1 << 64},
    lambda r: {**r, "nonce": True},
    lambda r: {**r, "type": 2},
    lambda r: {**r, "type": True},
    lambda r: {**r, "name": ""},
    lambda r: {**r, "name": "a\0b"},
    lambda r: {**r, "name": "n" * 16},
    lambda r: {**r, "name": "\udcff"},
    lambda r: [r],
]


@pytest.mark.parametrize("i", range(len(MALFORMED)))
def test_malformed_reports(real, i):
    rep, _ = real
    with pytest.raises(E.MalformedReport):
        tvmrt.verify_report(MALFORMED[i](rep))


def test_malformed_json(real):
    rep, _ = real
    good = json.loads(tvmrt.report_to_json(rep))
    bad = ["", "{", "[1]", json.dumps({**good, "format": "tvmrt-report-v0"}),
           json.dumps({**good, "sig": "zz" * 64}), json.dumps({**good, "sig": 5}),
           json.dumps({**good, "extra": 1}),
           json.dumps({k: v for k, v in good.items() if k != "nonce"}), b"\xff\xfe"]
    for text in bad:
        with pytest.raises(E.MalformedReport):
            tvmrt.report_from_json(text)


# ---------------------------------------------------------------- tvmrt verify
def test_verify_command_says_why(real, tmp_path):
    rep, code = real
    m = rep["measurement"].hex()
    pub = rep["public_key"].hex()

    def run(report, *extra):
        f = tmp_path / "r.json"
        f.write_text(report if isinstance(report, str) else tvmrt.report_to_json(report))
        return tvmrt_cmd("verify", str(f), "--measurement", m, *extra)

    r = run(rep, "--key", pub, "--nonce", "1234")
    assert r.returncode == 0 and r.stdout.startswith("OK: normal enclave 'att-normal'"), r
    assert "expected key" in r.stdout
    r = run(rep)
    assert r.returncode == 0 and "pass --key" in r.stdout
    (tmp_path / "pub.txt").write_text(pub + "\n")
    assert run(rep, "--key", str(tmp_path / "pub.txt")).returncode == 0

    cases = [
        (TAMPER["nonce"](rep), ("--key", pub), 4, "bad signature"),
        (TAMPER["sig"](rep), (), 4, "bad signature"),
        (TAMPER["public_key"](rep), ("--key", pub), 5, "wrong key"),
        (rep, ("--key", PEER.hex()), 5, "wrong key"),
        (rep, ("--nonce", "1"), 7, "nonce mismatch"),
        ("{not json", (), 3, "malformed report"),
    ]
    for report, extra, rc, what in cases:
        r = run(report, *extra)
        assert r.returncode == rc, (what, r)
        assert r.stderr.startswith(f"tvmrt verify: {what}: "), r.stderr
        assert r.stderr.count("\n") == 1 and not r.stdout, r.stderr
    other = expected_measurement(NORMAL, "x", code).hex()
    f = tmp_path / "r.json"
    f.write_text(tvmrt.report_to_json(rep))
    r = tvmrt_cmd("verify", str(f), "--measurement", other)
    assert r.returncode == 6 and r.stderr.startswith("tvmrt verify: measurement mismatch: ")
    r = tvmrt_cmd("verify", str(tmp_path / "missing.json"), "--measurement", m)
    assert r.returncode == 1 and r.stderr.startswith("tvmrt verify: cannot read ")
    r = tvmrt_cmd("verify", str(f), "--measurement", "abc")
    assert r.returncode == 1 and "--measurement" in r.stderr


def test_measure_command(tmp_path):
    code = (BUNDLED / "caller.py").read_bytes()
    r = tvmrt_cmd("measure", "caller", "--name", "test-caller")
    assert r.returncode == 0 and r.stdout.strip() == expected_measurement(
        NORMAL, "test-caller", code).hex()
    r = tvmrt_cmd("measure", str(BUNDLED / "server.py"), "--name", "test-server", "--server")
    assert r.stdout.strip() == expected_measurement(
        SERVER, "test-server", (BUNDLED / "server.py").read_bytes()).hex()


# ---------------------------------------------------------------- the key file, get_key
def _start_and_collect(key_file):
    """Start a monitor (with ``key_file`` or a fresh key), attest a server, run the keys
    eapp twice under one name and once under another; stop it."""
    with EmbeddedMonitor(key_file=key_file) as mon:
        with Host.connect(mon.path, embedded=False) as h:
            srv = h.create(eapp("echo_server"), name="attest-srv", type=SERVER)
            out = {"srv": srv.attest(9), "keys": _run_keys(h), "again": _run_keys(h),
                   "other": _run_keys(h, "att-keys2")}
    assert mon.proc is None
    return out


def test_key_file_persists_reports_and_derived_keys(tmp_path):
    kf = tmp_path / "monitor.key"
    first = _start_and_collect(str(kf))
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600
    assert kf.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    second = _start_and_collect(str(kf))
    fresh = _start_and_collect(None)

    pub = first["srv"]["public_key"]
    assert second["srv"]["public_key"] == pub != fresh["srv"]["public_key"]
    assert first["srv"] == second["srv"]           # same key, same fields: same report
    with Host.connect(key_file=str(kf)) as h:          # an embedded monitor with that key
        assert h.embedded is not None and h.ps()["public_key"] == pub
    r = tvmrt_cmd("pubkey", str(kf))
    assert r.returncode == 0 and r.stdout.strip() == pub.hex()
    seed = load_key(str(kf))
    assert raw_public(Ed25519PrivateKey.from_private_bytes(seed).public_key()) == pub

    keys_code = Path(eapp("keys")).read_bytes()
    m = expected_measurement(NORMAL, "att-keys", keys_code)
    k = first["keys"]
    # get_key is HKDF-SHA256(seed; salt = measurement, info = prefix + type byte)
    for name, ktype, size in (("enclave", 0, 32), ("storage", 1, 32), ("long", 0, 8160),
                              ("short", 1, 1)):
        want = HKDF(algorithm=hashes.SHA256(), length=size, salt=m,
                    info=b"tvmrt-get-key-v1\0" + bytes([ktype])).derive(seed)
        assert bytes.fromhex(k[name]) == want, name
    assert k["default"] == k["enclave"] != k["storage"]
    # deterministic per measurement: same code and name, same keys, in one monitor and
    # across restarts with the key file; another name (measurement) or key, other keys
    assert first["again"]["enclave"] == k["enclave"] == second["keys"]["enclave"]
    assert second["keys"]["storage"] == k["storage"]
    assert first["other"]["enclave"] != k["enclave"]
    assert fresh["keys"]["enclave"] != k["enclave"]
    assert fresh["keys"]["enclave"] == fresh["again"]["enclave"]
    assert k["refused"] == [E.InvalidArgument.code, E.InvalidArgument.code, E.BadSize.code,
                            E.BadSize.code, E.InvalidArgument.code, E.BadSize.code]

    # the eapp's own report and its report of the server verify with the pinned key
    own = tvmrt.report_from_json(k["own"])
    tvmrt.verify_report(own, measurement=m, key=pub, nonce=77)
    echo = Path(eapp("echo_server")).read_bytes()
    srv = tvmrt.report_from_json(k["srv"])
    tvmrt.verify_report(srv, measurement=expected_measurement(SERVER, "attest-srv", echo),
                        key=pub, nonce=5)
    tvmrt.verify_report(first["srv"], measurement=srv["measurement"], key=pub, nonce=9)


def _pem(key, password=None) -> bytes:
    enc = NoEncryption() if password is None else BestAvailableEncryption(password)
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, enc)


def test_key_file_refusals(tmp_path):
    def put(name, data, mode=0o600):
        p = tmp_path / name
        p.write_bytes(data)
        p.chmod(mode)
        return str(p)

    good = _pem(Ed25519PrivateKey.generate())
    cases = {
        put("open.key", good, 0o644): "is too open (mode 0644): chmod 600",
        put("group.key", good, 0o640): "is too open",
        put("garbage.key", b"not a key\n"): "is not a PEM Ed25519 private key",
        put("empty.key", b""): "is not a PEM Ed25519 private key",
        put("ec.key", _pem(ec.generate_private_key(ec.SECP256R1()))): "not an Ed25519",
        put("enc.key", _pem(Ed25519PrivateKey.generate(), b"pw")): "is encrypted",
        str(tmp_path): "is not a regular file",
        str(tmp_path / "no" / "dir" / "m.key"): "cannot create key file",
    }
    for path, why in cases.items():
        with pytest.raises(E.InvalidArgument) as ei:
            load_or_create_key(path)
        assert why in ei.value.reason and path in ei.value.reason, ei.value.reason
    # the monitor refuses with that one line, exit 1, before it listens
    sock = tmp_path / "m.sock"
    for path in (str(tmp_path / "open.key"), str(tmp_path / "garbage.key")):
        r = tvmrt_cmd("monitor", "--socket", str(sock), "--key", path)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r
        assert r.stderr.startswith(f"tvmrt monitor: key file {path} "), r.stderr
        assert not sock.exists()
    # an embedded monitor (Host.connect(key_file=)) refuses it in the host, no child left
    mon = EmbeddedMonitor(key_file=str(tmp_path / "open.key"))
    with pytest.raises(E.InvalidArgument):
        mon.start()
    assert mon.proc is None and mon.dir is None
    with pytest.raises(E.InvalidArgument):
        Host.connect(key_file=str(tmp_path / "x.key"), embedded=False)
    assert not (tmp_path / "x.key").exists()
    # a good file is loaded as it is, and a key made here is one cryptography reads
    assert load_key(put("good.key", good)) == load_pem_private_key(
        good, None).private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    made = load_or_create_key(str(tmp_path / "made.key"))
    assert len(made) == 32 and load_key(str(tmp_path / "made.key")) == made
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tvmrt-key-")] == []


# ---------------------------------------------------------------- the demo
def _words(lines, label):
    i = lines.index(label)
    return b"".join(int(w, 16).to_bytes(4, "little") for w in lines[i + 1:i + 17])


@pytest.mark.timeout(120)
def test_demo_prints_real_signatures_and_its_report_verifies(tmp_path):
    kf, rf = tmp_path / "m.key", tmp_path / "report.json"
    r = tvmrt_cmd("launch", "caller", "server", "server1", "--key", str(kf), "--report",
                  str(rf), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    host_dump = bytes(int(x, 16) for line in lines[:4] for x in line.replace(",", " ").split())
    rep = tvmrt.report_from_json(rf.read_text())
    assert host_dump == rep["sig"] and rep["nonce"] == 1234 and rep["name"] == "test-caller"
    pub = load_key(str(kf))
    pub = raw_public(Ed25519PrivateKey.from_private_bytes(pub).public_key())
    key = Ed25519PublicKey.from_public_bytes(pub)
    code = {n: (BUNDLED / f"{n}.py").read_bytes() for n in ("caller", "server", "server1")}
    # each report the enclaves print is a signature by the monitor's key, nonce 1
    for label, etype, name, eapp_ in (
            ("get the enclave report", NORMAL, "test-caller", "caller"),
            ("get the server1 enclave report", SERVER, "test-server1", "server1"),
            ("get the server enclave report", SERVER, "test-server", "server")):
        m = expected_measurement(etype, name, code[eapp_])
        key.verify(_words(lines, label), signed(m, 1, etype, name))
    m = tvmrt_cmd("measure", "caller", "--name", "test-caller").stdout.strip()
    r = tvmrt_cmd("verify", str(rf), "--measurement", m, "--key", str(kf), "--nonce", "1234")
    assert r.returncode == 0, r
    r = tvmrt_cmd("launch", "caller", "server", "--key", str(kf), "--socket", "x")
    assert r.returncode == 2 and "--key" in r.stderr


@pytest.mark.timeout(60)
def test_enclaves_do_not_inherit_the_monitor_key(tmp_path):
    """Every enclave is a fork of the zygote, itself a fork of the monitor: the key must
    come into being only after the zygote is forked, or any eapp could find it in its own
    memory and sign reports of its own making."""
    kf = tmp_path / "m.key"
    seed = load_or_create_key(str(kf))
    with Host.connect(key_file=str(kf)) as h:
        assert h.ps()["public_key"] == Ed25519PrivateKey.from_private_bytes(seed) \
            .public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        shm = h.shmget(0x1000)
        shm.view[:32] = seed
        enc = h.create(eapp("key_hunt"), name="hunter", shm=shm)
        found = enc.run()
        assert found == 0, f"the enclave found the key: {bytes(shm.view[64:1024])!r}"
        shm.remove()
