"""The package layout a newcomer reads: one Core whatever the import path, private
internals, public names re-exported and listed."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def run(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def test_tvmrt_tests_is_not_a_package():
    r = run("import tvmrt.tests")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


@pytest.mark.parametrize("top", ["monitor", "monitor.core", "eapps"])
def test_repo_directories_are_not_top_level_packages(top):
    """From the repository root (where `monitor/` is on sys.path) a top-level import
    fails instead of making a second Core class."""
    r = run(f"import {top}")
    assert r.returncode != 0 and "import the" in r.stderr


def test_one_core_class():
    r = run("import tvmrt.monitor.core as a, importlib; "
            "b = importlib.import_module('tvmrt.monitor.core'); "
            "from tvmrt.monitor.daemon import Core; "
            "assert a.Core is b.Core is Core; print('one')")
    assert r.stdout.strip() == "one", r.stderr


def test_public_names_are_listed_and_importable():
    import tvmrt
    for mod in ("tvmrt", "tvmrt.host", "tvmrt.eapp", "tvmrt.penglai", "tvmrt.errors"):
        m = importlib.import_module(mod)
        assert m.__all__, mod
        for name in m.__all__:
            assert getattr(m, name) is not None, f"{mod}.{name}"
    assert tvmrt.Host is importlib.import_module("tvmrt.host").Host


def test_internal_modules_are_private():
    names = {p.stem for p in (ROOT / "tvmrt").glob("*.py")}
    public = {n for n in names if not n.startswith("_")}
    assert public == {"host", "eapp", "penglai", "errors", "cli", "bench"}, public


def test_the_threat_model_names_tests_that_exist():
    """docs/security.md backs each claim with a test: every ``tests/FILE::NAME`` it names
    must exist (so the document cannot drift from the suite)."""
    import re
    from pathlib import Path
    root = Path(__file__).parent.parent
    text = (root / "docs" / "security.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(refs) >= 10
    for path, name in refs:
        src = (root / path).read_text()
        assert not name or re.search(rf"^def {name}\(", src, re.M), f"{path}::{name}"
