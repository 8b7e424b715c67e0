"""The API reference (``docs/api.md``), generated from the public names and their
docstrings, so that it cannot drift from the code: ``python -m tvmrt._apidoc`` writes it,
``tests/test_docs.py`` checks that the file is what this module makes."""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("tvmrt.host", "tvmrt.eapp", "tvmrt.penglai", "tvmrt.errors")
HEAD = """# API reference

Generated from the docstrings by `python -m tvmrt._apidoc` (a test checks that this file is
up to date). The tutorial is `docs/tutorial.md`; the wire protocol `docs/protocol.md`.
"""


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    d = inspect.getdoc(obj)
    return d.strip() if d else "(no docstring)"


def render() -> str:
    """The whole of ``docs/api.md``."""
    out = [HEAD]
    for modname in MODULES:
        mod = importlib.import_module(modname)
        out.append(f"\n## `{modname}`\n\n{_doc(mod).splitlines()[0]}\n")
        for name in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, name, None)
            if modname == "tvmrt.errors" and inspect.isclass(obj):
                code = getattr(obj, "code", None)
                base = obj.__mro__[1].__name__
                out.append(f"- `{name}` ({base}{f', code {code}' if code else ''}): "
                           f"{_doc(obj).splitlines()[0]}")
                continue
            if inspect.isclass(obj):
                out.append(f"\n### `{name}{_sig(obj)}`\n\n{_doc(obj)}\n")
                for mname, m in sorted(vars(obj).items()):
                    if mname.startswith("_") or not (inspect.isfunction(m)
                                                     or isinstance(m, property)):
                        continue
                    sig = "" if isinstance(m, property) else _sig(m)
                    out.append(f"- `{name}.{mname}{sig}`: "
                               + _doc(m).replace("\n", "\n  "))
            elif callable(obj):
                out.append(f"\n### `{name}{_sig(obj)}`\n\n{_doc(obj)}\n")
            else:
                out.append(f"- `{name}` = `{obj!r:.60}`")
    return "\n".join(out).rstrip() + "\n"


def path() -> Path:
    return Path(__file__).resolve().parent.parent / "docs" / "api.md"


if __name__ == "__main__":
    path().write_text(render())
    sys.exit(0)
