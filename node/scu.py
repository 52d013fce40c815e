"""Sending instances over C-STORE (the demo's sending PACS today; result delivery later).

Every instance's status is checked and returned: a sender must know what did not arrive.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

#: Send each file's dataset bytes as stored (no decode and re-encode on the way out).
_config.STORE_SEND_CHUNKED_DATASET = True


class AssociationFailed(ConnectionError):
    """The peer could not be reached, or rejected or aborted the association."""


@dataclass(frozen=True)
class Sent:
    """The outcome of one C-STORE: the peer's status (0x0000 is success) or the local error."""

    path: Path
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the peer answered success (or a warning: the instance was stored)."""
        return self.status is not None and (self.status == 0 or self.status & 0xF000 == 0xB000)


def send_files(
    paths: Iterable[Path],
    host: str,
    port: int,
    called_ae_title: str,
    calling_ae_title: str = "SPINENODE",
    ssl_context: ssl.SSLContext | None = None,
    on_sent: Callable[[Sent], None] | None = None,
) -> list[Sent]:
    """C-STORE every file over one association, proposing each file's SOP class and syntax."""
    files = list(paths)
    ae = AE(ae_title=calling_ae_title)
    ae.maximum_pdu_size = 0
    for sop_class, syntax in sorted({_context_of(path) for path in files}):
        ae.add_requested_context(sop_class, syntax)
    tls = (ssl_context, host) if ssl_context else None
    assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=tls)
    if not assoc.is_established:
        raise AssociationFailed(f"association with {called_ae_title}@{host}:{port} failed"
                                f" ({'rejected' if assoc.is_rejected else 'aborted or unreachable'})")
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results = []
    try:
        for path in files:
            result = _send_one(assoc, path)
            results.append(result)
            if on_sent is not None:
                on_sent(result)
    finally:
        assoc.release()
    return results


def echo(host: str, port: int, called_ae_title: str, calling_ae_title: str = "SPINENODE",
         ssl_context: ssl.SSLContext | None = None) -> bool:
    """C-ECHO the peer; True if it answered success."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=(ssl_context, host) if ssl_context else None)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()


def _send_one(assoc: object, path: Path) -> Sent:
    try:
        status = assoc.send_c_store(path)  # type: ignore[attr-defined]
    except (ValueError, AttributeError, OSError) as exc:
        return Sent(path, None, str(exc))
    if "Status" not in status:
        return Sent(path, None, "no response (association aborted or timed out)")
    return Sent(path, int(status.Status), str(status.get("ErrorComment", "")) or None)


def _context_of(path: Path) -> tuple[str, str]:
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
