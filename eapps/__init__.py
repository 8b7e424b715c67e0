"""The bundled enclave apps (installed as ``tvmrt.eapps``)."""
if __name__ != "tvmrt.eapps":
    raise ImportError(f"import the bundled eapps as tvmrt.eapps, not {__name__!r}")
