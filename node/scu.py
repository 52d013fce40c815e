"""Sending instances over C-STORE: the demo's sending PACS, and result delivery.

Every instance's status is checked and returned: a sender must know what did not arrive.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom.association import Association
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind  # type: ignore[attr-defined]
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Settings

#: Send each file's dataset bytes as stored (no decode and re-encode on the way out).
_config.STORE_SEND_CHUNKED_DATASET = True


#: Seconds a confirming C-FIND may wait for its reply (a PACS answers these at once).
FIND_TIMEOUT_S = 5.0


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
    assoc = associate(host, port, called_ae_title, calling_ae_title, {context_of(path) for path in files}, ssl_context)
    results = []
    try:
        for path in files:
            result = send_one(assoc, path)
            results.append(result)
            if on_sent is not None:
                on_sent(result)
    finally:
        assoc.release()
    return results


def associate(host: str, port: int, called_ae_title: str, calling_ae_title: str, contexts: Iterable[tuple[str, str]],
              ssl_context: ssl.SSLContext | None = None) -> Association:
    """An established association proposing ``contexts`` (SOP class, transfer syntax), or AssociationFailed."""
    ae = AE(ae_title=calling_ae_title)
    ae.maximum_pdu_size = 0
    for sop_class, syntax in sorted(set(contexts)):
        ae.add_requested_context(sop_class, syntax)
    tls = (ssl_context, host) if ssl_context else None
    try:
        assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=tls)
    except (OSError, ssl.SSLError) as exc:
        raise AssociationFailed(f"association with {called_ae_title}@{host}:{port} failed ({exc})") from exc
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else (tls_failure(host, port, ssl_context) or "aborted or unreachable")
        raise AssociationFailed(f"association with {called_ae_title}@{host}:{port} failed ({why})")
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def tls_failure(host: str, port: int, ssl_context: ssl.SSLContext | None) -> str | None:
    """Why a TLS handshake with the peer fails (e.g. its certificate is not verified), or None.
    pynetdicom only logs the reason; an operator needs it on the delivery row."""
    if ssl_context is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=10) as raw, ssl_context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLError as exc:
        return f"TLS: {exc}"
    except OSError:
        return None


def held_by_peer(assoc: Association, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> set[str] | None:
    """Which of the instances the peer now holds, by C-FIND at IMAGE level (Study Root); None when
    the peer accepted no C-FIND context. A status 0x0000 alone does not prove storage: some PACS
    answer success for instances they discard.

    An instance not found is asked for a second time: pynetdicom (3.0) can drop the reply of a
    peer that answers at once (about 1 in 100 against Orthanc, pynetdicom issue 875), and one
    dropped reply must not make a stored object look discarded. A dropped final reply makes
    pynetdicom wait out the DIMSE timeout (short here: a PACS answers these at once) and abort
    the association: then nothing is confirmed, and AssociationFailed says so.
    """
    if not any(str(cx.abstract_syntax) == StudyRootFind for cx in assoc.accepted_contexts):
        return None
    wanted = list(sop_instance_uids)
    held: set[str] = set()
    previous, assoc.dimse_timeout = assoc.dimse_timeout, FIND_TIMEOUT_S
    try:
        for _ in range(2):
            for uid in wanted:
                if uid not in held and assoc.is_established:
                    held |= _find_instance(assoc, study_instance_uid, uid)
            if held >= set(wanted):
                break
    finally:
        assoc.dimse_timeout = previous
    if not assoc.is_established:
        raise AssociationFailed("the association ended during the C-FIND confirmation")
    return held


def _find_instance(assoc: Association, study_instance_uid: str, sop_instance_uid: str) -> set[str]:
    """The SOP Instance UIDs one IMAGE-level C-FIND for ``sop_instance_uid`` returns."""
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = (
        "IMAGE", study_instance_uid, "", sop_instance_uid)
    found = set()
    for status, identifier in assoc.send_c_find(query, StudyRootFind):
        if "Status" in status and int(status.Status) in (0xFF00, 0xFF01) and identifier is not None:
            found.add(str(identifier.get("SOPInstanceUID", "")))
    return found


def client_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS for sending: the peer is verified against ``tls.ca_file`` (else the system CAs), and
    our certificate is offered for peers that ask for one."""
    if settings.tls is None:
        raise ValueError("a destination asks for TLS but the tls settings (cert_file, key_file, ca_file) are missing")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls.ca_file)
    context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    return context


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


def send_one(assoc: Association, path: Path) -> Sent:
    """C-STORE one file on an open association; the peer's status, or why there is none."""
    if not assoc.is_established:
        return Sent(path, None, "the association has ended")
    try:
        status = assoc.send_c_store(path)
    except (ValueError, AttributeError, OSError, RuntimeError) as exc:  # RuntimeError: aborted meanwhile
        return Sent(path, None, str(exc))
    if "Status" not in status:
        return Sent(path, None, "no response (association aborted or timed out)")
    return Sent(path, int(status.Status), str(status.get("ErrorComment", "")) or None)


def context_of(path: Path) -> tuple[str, str]:
    """The file's SOP class and transfer syntax, from its meta header."""
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
