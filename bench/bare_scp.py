"""The floor of the node's network edge: its pynetdicom SCP with nothing behind it.

The node's AE, server and association threads (node.scp, node.reactor), with a C-STORE handler
that writes the dataset's bytes as received to one file per instance and answers success: no
decoding, no fsync, no index. What the node spends beyond this is its storage; what this spends
beyond dcmtk's storescp is pynetdicom's.

    python -m bench.bare_scp --port 11113 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.config import load_settings
from node.scp import SUCCESS, ConnectionHandler, ReceiverServer, handle_echo, make_ae

AE_TITLE = "BARESCP"


def handle_store(event: Event, out: Path) -> int:
    """Write the dataset as received, named by its SOP Instance UID, and answer success."""
    (out / str(cast(C_STORE, event.request).AffectedSOPInstanceUID)).write_bytes(event.encoded_dataset())
    return SUCCESS


def main(argv: list[str] | None = None) -> int:
    """Serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare_scp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder the instances are written to")
    args = parser.parse_args(argv)
    ae = make_ae(load_settings(ae_title=AE_TITLE))
    server = cast(ReceiverServer, ae.make_server(
        ("127.0.0.1", args.port), evt_handlers=[(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [args.out])],
        server_class=ReceiverServer, request_handler=ConnectionHandler))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
