"""The tvmrt monitor (installed as ``tvmrt.monitor``): ``core`` is the pure state
machine, ``daemon`` the I/O shell around it, ``zygote`` the fork server."""
if __name__ != "tvmrt.monitor":
    # One Core class whatever the import path: the repository's monitor/ directory is
    # the package tvmrt.monitor (mapped by packaging), never a top-level "monitor".
    raise ImportError(f"import the monitor as tvmrt.monitor, not {__name__!r} "
                      f"(install the project: pip install -e .)")
