"""get_key and get_report from inside.  Writes one JSON object into its shared memory
(4-byte little-endian length, then the text): derived keys in hex, the codes of refused
get_key calls, its own report (nonce 77) and the report of server "attest-srv" (nonce 5)
if one runs (reports in tvmrt's JSON form)."""
import json

from tvmrt import report_to_json
from tvmrt.eapp import *


def main(args):
    out = {
        "enclave": get_key(ENCLAVE_KEY, 32).hex(),
        "storage": get_key(STORAGE_KEY, 32).hex(),
        "default": get_key().hex(),
        "long": get_key(ENCLAVE_KEY, 8160).hex(),
        "short": get_key(STORAGE_KEY, 1).hex(),
    }
    refused = []
    for key_type, size in ((2, 32), (-1, 32), (ENCLAVE_KEY, 0), (ENCLAVE_KEY, 8161),
                           ("0", 32), (ENCLAVE_KEY, 1 << 64)):
        refused.append(None if get_key(key_type, size) is None else "got a key")
        refused[-1] = last_error().code if refused[-1] is None else refused[-1]
    out["refused"] = refused
    out["own"] = report_to_json(get_report(None, 77))
    srv = get_report("attest-srv", 5)
    out["srv"] = None if srv is None else report_to_json(srv)
    blob = json.dumps(out).encode()
    m = mem(args[10], args[11])
    m[:4] = len(blob).to_bytes(4, "little")
    m[4:4 + len(blob)] = blob
    return 0
