"""Hosts of Penglai's demos, ported line by line with :mod:`tvmrt.penglai`.

``test_caller`` is ``demo/IPC/test-caller/host.c``; ``run_one`` is
``demo/host/host.c`` for a single normal enclave (e.g. hello_world).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys

from . import penglai
from .errors import InvalidArgument, MonitorGone
from .penglai import (
    NORMAL_ENCLAVE,
    SERVER_ENCLAVE,
    PLenclave,
    PLenclave_attest,
    PLenclave_create,
    PLenclave_destroy,
    PLenclave_destruct,
    PLenclave_init,
    PLenclave_run,
    PLenclave_schrodinger_at,
    PLenclave_schrodinger_ctl,
    PLenclave_schrodinger_dt,
    PLenclave_schrodinger_get,
    PLenclave_set_mem_arg,
    PLenclave_shmat,
    PLenclave_shmctl,
    PLenclave_shmdt,
    PLenclave_shmget,
    elf_args,
    elf_args_destroy,
    elf_args_init,
    elf_valid,
    enclave_args,
    enclave_args_init,
)


@contextlib.contextmanager
def monitor_loss_raises():
    """Within this, a Penglai-layer call that finds the monitor gone raises MonitorGone
    instead of printing the loss and returning its code.

    The layer reports every failure on stderr and returns the code, as Penglai's
    library does, and the demos go on to their clean-up; once the monitor is gone, each
    of those calls would report the same loss again.  ``tvmrt launch`` ends at the first
    one and says it once.  Other failures are reported by the layer as usual."""
    report = penglai._fail

    def fail(fn, exc):
        if isinstance(exc, MonitorGone):
            raise exc
        return report(fn, exc)

    penglai._fail = fail
    try:
        yield
    finally:
        penglai._fail = report


def print_signature(sig: bytes) -> None:
    """The host's report dump: ``0x%02X, `` with a space every 4 bytes, 16 per line."""
    line = ""
    for i, b in enumerate(sig[:64]):
        line += f"0x{b:02X}, "
        if i % 4 == 3:
            line += " "
        if i % 16 == 15:
            print(line.rstrip())
            line = ""
    print(line, end="", flush=True)


def _write_report(path: str, report: dict) -> None:
    """The report as JSON in ``path`` (not the port: tvmrt's ``launch --report``)."""
    from ._attest import report_to_json
    try:
        with open(path, "w") as f:
            f.write(report_to_json(report) + "\n")
    except OSError as exc:
        raise InvalidArgument(f"cannot write the report to {path}: {exc.strerror}") from None


def test_caller(caller_file: str, server_file: str, server1_file: str | None = None,
                report_file: str | None = None) -> int:
    """``./test-caller caller server [server1]``; returns the process exit code.

    ``report_file``: also write the caller's report (the one whose signature is
    printed) there as JSON (:func:`tvmrt.report_to_json`), for ``tvmrt verify``."""
    rc = 1
    caller_enclave, server_enclave, server1_enclave = PLenclave(), PLenclave(), PLenclave()
    caller_elf, server_elf, server1_elf = elf_args(), elf_args(), elf_args()
    elf_args_init(caller_elf, caller_file)
    elf_args_init(server_elf, server_file)
    if server1_file:
        elf_args_init(server1_elf, server1_file)
    if not elf_valid(caller_elf) or not elf_valid(server_elf) or (
            server1_file and not elf_valid(server1_elf)):
        print("error when initializing enclave elf")
        return 1
    for enc in (caller_enclave, server_enclave, server1_enclave):
        if PLenclave_init(enc) < 0:
            print("host: failed to initialize enclave")
            return 1
    shmid = mm_arg_id = -1
    shm = mm_arg = 0
    abandoned = False
    try:
        server_params = enclave_args()
        enclave_args_init(server_params)
        server_params.name = "test-server"
        server_params.type = SERVER_ENCLAVE
        if PLenclave_create(server_enclave, server_elf, server_params) < 0:
            print("host: failed to create server enclave")
            return 1
        if server1_file:
            server1_params = enclave_args()
            enclave_args_init(server1_params)
            server1_params.name = "test-server1"
            server1_params.type = SERVER_ENCLAVE
            if PLenclave_create(server1_enclave, server1_elf, server1_params) < 0:
                print("host: failed to create server1 enclave")
                return 1

        caller_params = enclave_args()
        enclave_args_init(caller_params)
        # Allocate the shared memory for enclave
        shm_size = 0x1000 * 4
        shmid = PLenclave_shmget(shm_size)
        shm = PLenclave_shmat(shmid, 0)
        if shmid < 0 or shm < 0:
            return 1
        ctypes.c_int.from_address(shm).value = 11111
        caller_params.shmid = shmid
        caller_params.shm_offset = 0
        caller_params.shm_size = shm_size

        # Allocate the relay/schrodinger page for enclave
        mm_arg_size = 0x1000 * 4
        mm_arg_id = PLenclave_schrodinger_get(mm_arg_size)
        mm_arg = PLenclave_schrodinger_at(mm_arg_id, 0)
        if mm_arg_id < 0 or mm_arg < 0:
            return 1
        ctypes.c_int.from_address(mm_arg).value = 22222

        caller_params.name = "test-caller"
        caller_params.type = NORMAL_ENCLAVE
        if PLenclave_create(caller_enclave, caller_elf, caller_params) < 0:
            print("host: failed to create caller_enclave")
            return 1
        if PLenclave_attest(caller_enclave, 1234) == 0:
            print_signature(caller_enclave.attest_param.report["sig"])
            if report_file is not None:
                _write_report(report_file, caller_enclave.attest_param.report)

        # Assign the schrodinger page to the enclave before it runs
        if mm_arg_id > 0 and mm_arg:
            PLenclave_set_mem_arg(caller_enclave, mm_arg_id, 0, mm_arg_size)
        if PLenclave_run(caller_enclave) < 0:
            print("host: failed to run caller_enclave")
            return 1
        rc = 0
    except BaseException:
        # Left by an exception (^C, a stop signal, the monitor gone under tvmrt launch):
        # the process is ending, and closing the device releases everything it holds,
        # as Penglai's driver does for a host that dies.  Releasing piece by piece here
        # would only fail, noisily, on what is busy (the relay page an enclave holds).
        abandoned = True
        raise
    finally:
        if not abandoned:
            _release(shmid, shm, mm_arg_id, mm_arg)
            if server_enclave.eid >= 0:
                PLenclave_destroy(server_enclave)
            if server1_enclave.eid >= 0:
                PLenclave_destroy(server1_enclave)
            for enc in (caller_enclave, server_enclave, server1_enclave):
                PLenclave_destruct(enc)
            for elf in (caller_elf, server_elf, server1_elf):
                elf_args_destroy(elf)
    return rc


def run_one(eapp_file: str, name: str = "test-enclave") -> int:
    """``./host NAME``: create one normal enclave, run it, print how it ended."""
    enclave, elf, params = PLenclave(), elf_args(), enclave_args()
    elf_args_init(elf, eapp_file)
    if not elf_valid(elf):
        print("error when initializing enclave elf")
        return 1
    if PLenclave_init(enclave) < 0:
        return 1
    enclave_args_init(params)
    params.name = name
    if PLenclave_create(enclave, elf, params) < 0:
        print("host: failed to create enclave")
        return 1
    ret = PLenclave_run(enclave)
    print("host: PLenclave run is finish ", flush=True)
    PLenclave_destruct(enclave)
    elf_args_destroy(elf)
    return 0 if ret == 0 else 1


def _release(shmid: int, shm: int, mm_arg_id: int, mm_arg: int) -> None:
    """The demos' teardown of their shared memory and schrodinger page, as host.c does
    it: unmap and remove what was made (a negative id or address: nothing was)."""
    if shm > 0:
        PLenclave_shmdt(shmid, shm)
    if shmid > 0:
        PLenclave_shmctl(shmid)
    if mm_arg > 0:
        PLenclave_schrodinger_dt(mm_arg_id, mm_arg)
    if mm_arg_id > 0:
        PLenclave_schrodinger_ctl(mm_arg_id)


def host(eapp_file: str, count: int = 1) -> int:
    """``./host ELF [N]`` (``demo/host/host.c``): N threads, each creating a normal
    enclave ``test-enclave<i>`` with one page of shared memory (11111) and one
    schrodinger page (22222), attesting it (nonce 0), binding the page and running it;
    a run that returns 1 (the eapp handed its relay page back) writes 0 into the page,
    sets the rerun arg and runs again.  Returns the process exit code (0 when every
    enclave ran to its end)."""
    import threading

    from .penglai import PLenclave_set_rerun_arg

    elf = elf_args()
    elf_args_init(elf, eapp_file)
    if not elf_valid(elf):
        print("error when initializing enclave elf")
        return 1
    failed = []
    lock = threading.Lock()
    say_lock = threading.Lock()

    def say(line: str) -> None:
        # one write per line: the threads' lines (and the enclaves', which share the
        # terminal) never interleave mid-line
        with say_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def one(i: int) -> None:
        enclave, params = PLenclave(), enclave_args()
        if PLenclave_init(enclave) < 0:
            failed.append(i)
            return
        enclave_args_init(params)
        shmid = PLenclave_shmget(0x1000)
        shm = PLenclave_shmat(shmid, 0)
        mm_arg_id = PLenclave_schrodinger_get(0x1000)
        mm_arg = PLenclave_schrodinger_at(mm_arg_id, 0)
        try:
            if shmid < 0 or shm < 0 or mm_arg_id < 0 or mm_arg < 0:
                failed.append(i)
                return
            ctypes.c_int.from_address(shm).value = 11111
            ctypes.c_int.from_address(mm_arg).value = 22222
            params.shmid, params.shm_offset, params.shm_size = shmid, 0, 0x1000
            params.name = f"test-enclave{i}"
            with lock:              # elf_args is shared by the threads, as in host.c
                created = PLenclave_create(enclave, elf, params)
            if created < 0:
                say("host: failed to create enclave")
                failed.append(i)
                return
            PLenclave_attest(enclave, 0)
            PLenclave_set_mem_arg(enclave, mm_arg_id, 0, 0x1000)
            while True:
                ret = PLenclave_run(enclave)
                if ret == 1:
                    # the relay page is ours again: change it, then continue the enclave
                    ctypes.c_int.from_address(mm_arg).value = 0
                    PLenclave_set_rerun_arg(enclave, 1)
                    continue
                break
            if ret < 0:
                say("host: failed to run enclave")
                failed.append(i)
            say("host: PLenclave run is finish ")
        finally:
            _release(shmid, shm, mm_arg_id, mm_arg)
            PLenclave_destruct(enclave)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say("host: after exit the thread")
    elf_args_destroy(elf)
    return 1 if failed else 0


def test_stop(eapp_file: str = "loop", pause: float = 1.0) -> int:
    """``./test-stop loop`` (demo/test-stop/host.c): one enclave with 4 pages of shared
    memory (int 11111) runs in a thread; the main thread stops it, resumes it and
    destroys it, ``pause`` seconds apart.  Beyond Penglai's lines it prints what it saw:
    the enclave's counter (int 0 of the shared memory, which ``eapps/loop.py`` increments)
    frozen while stopped, moving after resume.  0 if both held."""
    import threading
    import time

    enclave, elf, params = PLenclave(), elf_args(), enclave_args()
    elf_args_init(elf, eapp_file)
    if not elf_valid(elf):
        print("error when initializing enclave elf")
        return 1
    if PLenclave_init(enclave) < 0:
        return 1
    enclave_args_init(params)
    params.name = "test-stop"
    shmid = PLenclave_shmget(0x4000)
    shm = PLenclave_shmat(shmid, 0)
    if shmid < 0 or shm < 0:
        return 1
    counter = ctypes.c_int.from_address(shm)
    counter.value = 11111
    params.shmid, params.shm_offset, params.shm_size = shmid, 0, 0x4000
    if PLenclave_create(enclave, elf, params) < 0:
        print("host: failed to create enclave")
        return 1

    def run():
        PLenclave_attest(enclave, 0)
        PLenclave_run(enclave)
        print("host: PLenclave run is finish ", flush=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ok = True
    try:
        time.sleep(pause)
        print("host0: stop enclave", flush=True)
        ok &= penglai.PLenclave_stop(enclave) == 0
        time.sleep(0.1)              # the SIGSTOP lands
        before = counter.value
        time.sleep(pause)
        frozen = counter.value == before
        print(f"host: counter {before} -> {counter.value} while stopped: "
              f"{'frozen' if frozen else 'MOVED'}", flush=True)
        print("host0: resume enclave", flush=True)
        ok &= penglai.PLenclave_resume(enclave) == 0
        before = counter.value
        time.sleep(pause)
        moved = counter.value > before
        print(f"host: counter {before} -> {counter.value} after resume: "
              f"{'moving' if moved else 'STILL'}", flush=True)
        ok &= frozen and moved
    finally:
        print("host0: destroy enclave", flush=True)
        ok &= PLenclave_destroy(enclave) == 0
        thread.join(30)
    print("host: after exit the thread", flush=True)
    PLenclave_destruct(enclave)
    elf_args_destroy(elf)
    PLenclave_shmdt(shmid, shm)
    PLenclave_shmctl(shmid)
    return 0 if ok and not thread.is_alive() else 1
