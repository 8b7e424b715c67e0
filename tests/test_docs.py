"""The tutorial runs: every ``eapp=FILE`` block of ``docs/tutorial.md`` is written to a
directory, every ``host`` block is run there with Python (its own embedded monitor), and
what it prints is compared with the ``output`` block after it (``...`` stands for any
number of lines)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _programs():
    """[(eapps {file: code}, host code, expected lines)] in document order."""
    eapps: dict[str, str] = {}
    out, host = [], None
    for lang, info, body in BLOCK.findall(DOC.read_text()):
        info = info.strip()
        if lang == "python" and info.startswith("eapp="):
            eapps[info[5:]] = body
        elif lang == "python" and info == "host":
            host = body
        elif lang == "text" and info == "output" and host is not None:
            out.append((dict(eapps), host, body.splitlines()))
            host = None
    return out


def _match(want, got):
    if not want:
        return not got
    if want[0] == "...":
        return any(_match(want[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == want[0] and _match(want[1:], got[1:])


PROGRAMS = _programs()


def test_the_tutorial_has_its_examples():
    assert len(PROGRAMS) >= 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("i", range(len(PROGRAMS)))
def test_tutorial_example_runs_as_shown(i, tmp_path):
    eapps, host, want = PROGRAMS[i]
    for name, code in eapps.items():
        (tmp_path / name).write_text(code)
    (tmp_path / "host.py").write_text(host)
    r = subprocess.run([sys.executable, "host.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    got = r.stdout.splitlines()
    assert _match(want, got), f"printed:\n{r.stdout}\nexpected:\n" + "\n".join(want)


def test_the_api_reference_is_up_to_date():
    """docs/api.md is what the docstrings say (regenerate: python -m tvmrt._apidoc)."""
    from tvmrt import _apidoc
    assert _apidoc.path().read_text() == _apidoc.render(), \
        "docs/api.md is stale: run python -m tvmrt._apidoc"
