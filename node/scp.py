"""The DICOM network edge: a pynetdicom SCP for C-ECHO and C-STORE.

The C-STORE handler only stores and records (:class:`~node.store.InstanceStore`); every
error becomes a DICOM status here, in one place. Several receiving processes can share the
port (node.handoff), since one Python process tops out at one core.

Limits: ``max_associations`` per process (pynetdicom rejects the next one), ``max_pdu_size``
(announced, and a longer PDU is aborted at its header by :class:`PDULimitedSocket`), and
``max_instance_bytes`` (0xA700 before the dataset is decoded or copied).
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import ssl
import threading
import time
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from node.config import Settings
from node.metrics import (
    DUPLICATE_INSTANCES,
    INSTANCES_RECEIVED,
    INSTANCES_REFUSED,
    RECEIVED_BYTES,
    Refusal,
    refuse_association,
)
from node.reactor import PromptSocket, end_prompt, make_prompt
from node.store import InstanceStore, InvalidInstance, OutOfResources, UndecodableInstance, header_text

LOGGER = logging.getLogger(__name__)

# DICOM statuses we answer with (PS3.4 B.2.3 and pynetdicom's storage statuses).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC211

#: PDU types (PS3.8 9.3): P-DATA-TF is bounded by our maximum PDU length; the others by MAX_OTHER_PDU.
P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
#: Longest PDU of another type we read: an A-ASSOCIATE-RQ with all 128 presentation contexts and
#: user identity is far below it; without a bound pynetdicom reads whatever length it is told.
MAX_OTHER_PDU = 1 << 20
PDU_HEADER = 6

#: Our preference when a sender offers several syntaxes for one context (pynetdicom takes the
#: first of ours that is offered). Lossless compressed first, so compressed instances are kept
#: as they are; then Explicit VR Little Endian, so uncompressed ones are never transcoded;
#: then the rest (lossy ones after uncompressed, so nothing is made lossy on our account).
LOSSLESS_COMPRESSED = [JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless]
TRANSFER_SYNTAXES = [*LOSSLESS_COMPRESSED, ExplicitVRLittleEndian] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (*LOSSLESS_COMPRESSED, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
] + [ImplicitVRLittleEndian]


class PDUTooLong(Exception):
    """A peer announced a PDU longer than we accept (not an OSError, so pynetdicom aborts)."""


class PDULimitedSocket(PromptSocket):
    """An association socket that refuses a PDU longer than we accept, from its header alone.

    pynetdicom reads the 6-byte header of each PDU, then as many bytes as the header says, up to
    4 GiB, whatever maximum length we announced. Raising from the header read makes pynetdicom's
    reactor send an A-ABORT and end the association before the body is read.
    """

    _body_next = False

    def recv(self, nr_bytes: int) -> bytearray:
        """Read as pynetdicom asks; check each PDU header against the limits."""
        data = super().recv(nr_bytes)
        if self._body_next or nr_bytes != PDU_HEADER or len(data) != PDU_HEADER:
            self._body_next = False
            return data
        pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
        if pdu_type not in KNOWN_PDU_TYPES:
            return data  # pynetdicom aborts on an unknown type without reading a body
        limit = self.assoc.acceptor.maximum_length if pdu_type == P_DATA_TF else MAX_OTHER_PDU
        if limit and length > limit:
            LOGGER.warning("aborting the association from %s: a PDU of type 0x%02X of %d bytes, over %d",
                           self.assoc.requestor.address, pdu_type, length, limit)
            raise PDUTooLong(f"PDU of {length} bytes, over {limit}")
        self._body_next = True  # pynetdicom reads the body next
        return data


class ConnectionHandler(RequestHandler):
    """Serves one connection: its association reads through a PDULimitedSocket, its threads wait
    rather than poll (node.reactor), and the connection's thread lasts as long as the
    association, so the server knows when it ends (pynetdicom's own events miss associations its
    reactor gives up on)."""

    assoc: Association

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds a plain AssociationSocket here and offers no factory to override;
        # the subclass only overrides methods (ready, recv, close), so the instance can take its class.
        cast(AssociationSocket, assoc.dul.socket).__class__ = PDULimitedSocket
        make_prompt(assoc)
        self.assoc = assoc
        return assoc

    def handle(self) -> None:
        """Start the association, wait until it has ended, then free what made it prompt
        (pynetdicom does not always close its socket object: socketserver closes the connection)."""
        try:
            super().handle()
            self.assoc.join()
        finally:
            if hasattr(self, "assoc"):
                end_prompt(self.assoc)


class ReceiverServer(ThreadedAssociationServer):
    """An association server with Nagle off, PDU limits, and a stop that drains running associations."""

    request_queue_size = 64
    #: A connection's thread lasts as long as its association: stop() drains and aborts them, and
    #: server_close() does not join them (a peer stuck in a TLS handshake would hold it forever).
    daemon_threads = True
    block_on_close = False
    #: False for a server fed connections by another process (node.handoff): no accept loop runs.
    accepts = True

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Serve one connection until its association ends, then call :meth:`connection_ended`."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_ended()

    def connection_ended(self) -> None:
        """A connection handed to this server is closed (node.handoff reports it)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and set TCP_NODELAY on it (about 10x faster on loopback); a failed
        TLS handshake is counted and logged (socketserver drops the connection quietly)."""
        try:
            sock, address = super().get_request()
        except ssl.SSLError as exc:
            refuse_association(Refusal.TLS_HANDSHAKE)
            LOGGER.warning("TLS handshake failed: %s", exc.reason or exc)
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, give running associations ``grace_s`` to finish, close the socket."""
        if self.accepts:
            socketserver.BaseServer.shutdown(self)
        deadline = time.monotonic() + grace_s
        while any(a.is_established for a in self.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.active_associations:
            assoc.abort()  # the sender did not finish in time: what it was not answered, it sends again
        self.server_close()


def handle_echo(event: Event) -> int:
    """C-ECHO: always success once the association is accepted."""
    return SUCCESS


def handle_store(event: Event, store: InstanceStore) -> int | Dataset:
    """C-STORE: store the instance durably, then answer; every failure becomes a status."""
    calling = event.assoc.requestor.ae_title
    try:
        store.check_size(_received_size(event))
        ds = _decode(event)
        _check_sop_class(ds, event.context.abstract_syntax)
        encoded = event.encoded_dataset()
        stored = store.store(ds, encoded, event.context.transfer_syntax, calling)
    except InvalidInstance as exc:
        LOGGER.warning("refused instance from %s: %s", calling, exc)
        return _refuse(DATASET_DOES_NOT_MATCH, str(exc))
    except OutOfResources as exc:
        LOGGER.error("refused instance from %s: %s", calling, exc.strerror)
        return _refuse(OUT_OF_RESOURCES, exc.strerror or "out of resources")
    except UndecodableInstance as exc:
        LOGGER.warning("refused instance from %s: %s", calling, exc)
        return _refuse(CANNOT_UNDERSTAND, str(exc))
    except Exception:
        LOGGER.exception("failed to store an instance from %s", calling)
        return _refuse(PROCESSING_FAILURE, "internal error while storing")
    _count_received(event.context.transfer_syntax, len(encoded), stored.duplicate)
    if stored.new_series:
        LOGGER.info("new series %s in study %s", stored.identifiers.series_instance_uid,
                    stored.identifiers.study_instance_uid)
    return SUCCESS


def _received_size(event: Event) -> int:
    """Bytes of the dataset as received, measured on pynetdicom's buffer without copying it."""
    with cast(io.BytesIO, cast(C_STORE, event.request).DataSet).getbuffer() as view:
        return view.nbytes


def _decode(event: Event) -> Dataset:
    """The received dataset; whatever pydicom raises on malformed bytes (OSError, struct.error,
    RecursionError on deep sequences, ...) becomes UndecodableInstance."""
    try:
        return event.dataset
    except Exception as exc:
        raise UndecodableInstance(f"dataset could not be decoded: {type(exc).__name__}") from exc


def _count_received(transfer_syntax: str, size: int, duplicate: bool) -> None:
    syntax = UID(transfer_syntax).keyword or str(transfer_syntax)
    if duplicate:
        DUPLICATE_INSTANCES.labels(transfer_syntax=syntax).inc()
        return
    INSTANCES_RECEIVED.labels(transfer_syntax=syntax).inc()
    RECEIVED_BYTES.labels(transfer_syntax=syntax).inc(size)


def _check_sop_class(ds: Dataset, abstract_syntax: str) -> None:
    """The dataset must be of the SOP class its presentation context was negotiated for."""
    sop_class = header_text(ds, "SOPClassUID")
    if sop_class and sop_class != abstract_syntax:
        raise InvalidInstance(f"SOPClassUID {sop_class} does not match the context's {abstract_syntax}")


def _refuse(code: int, comment: str) -> Dataset:
    """The failure status ``code`` with ``comment``, counted."""
    INSTANCES_REFUSED.labels(status=f"0x{code:04X}").inc()
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def handle_requested(event: Event, settings: Settings) -> None:
    """Reject callers that are not on the allowlist (AE title and host), before negotiation."""
    if not settings.allowed_callers:
        return
    requestor = event.assoc.requestor
    calling = requestor.primitive.calling_ae_title if requestor.primitive else ""  # ae_title is set after this event
    if any(caller.admits(calling, requestor.address) for caller in settings.allowed_callers):
        return
    LOGGER.warning("rejected association from %s at %s: not on the allowlist", calling, requestor.address)
    refuse_association(Refusal.CALLER_NOT_ALLOWED)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
    event.assoc.kill()  # as pynetdicom's own ACSE does: waits until the reject PDU is out


def handle_rejected(event: Event) -> None:
    """An association pynetdicom rejected while negotiating (the allowlist's are counted above):
    count it and say why."""
    assoc = event.assoc
    if not assoc.is_acceptor:
        return
    reason = _rejection_reason(assoc)
    refuse_association(reason)
    primitive = assoc.requestor.primitive
    why = {Refusal.CALLED_AE_TITLE: f"called AE title {primitive.called_ae_title if primitive else '?'} is not ours",
           Refusal.TOO_MANY_ASSOCIATIONS: f"{assoc.ae.maximum_associations} associations already open"}
    LOGGER.warning("rejected association from %s at %s: %s", primitive.calling_ae_title if primitive else "?",
                   assoc.requestor.address, why.get(reason, "refused while negotiating"))


def _rejection_reason(assoc: Association) -> Refusal:
    """The rejection pynetdicom's acceptor made, in its order of precedence (the association
    limit overrides the called AE title)."""
    acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
    if len(acceptors) > assoc.ae.maximum_associations:
        return Refusal.TOO_MANY_ASSOCIATIONS
    primitive = assoc.requestor.primitive
    if primitive is not None and assoc.ae.require_called_aet and primitive.called_ae_title != assoc.acceptor.ae_title.strip():
        return Refusal.CALLED_AE_TITLE
    return Refusal.OTHER


def make_ae(settings: Settings) -> AE:
    """The application entity: our AE title checked, every storage SOP class supported."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size  # announced, and enforced by PDULimitedSocket
    ae.acse_timeout = 15  # a peer that connects and says nothing is dropped after this
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
    return ae


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context, or None for plain TCP."""
    tls = settings.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca_file is None:
        context.verify_mode = ssl.CERT_NONE
    return context


def scp_handlers(settings: Settings, store: InstanceStore) -> list[Any]:
    """The event handlers of every receiving server: echo, store, the caller allowlist, and the
    count of associations pynetdicom rejects."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store]),
        (evt.EVT_REQUESTED, handle_requested, [settings]),
        (evt.EVT_REJECTED, handle_rejected),
    ]


def start_scp(settings: Settings, store: InstanceStore) -> ReceiverServer:
    """Start listening in a background thread; ``server.stop()`` stops it."""
    ae = make_ae(settings)
    server = cast(ReceiverServer, ae.make_server(
        (settings.host, settings.port),
        evt_handlers=scp_handlers(settings, store),
        ssl_context=make_ssl_context(settings),
        server_class=ReceiverServer,
        request_handler=ConnectionHandler,
    ))
    threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True).start()
    LOGGER.info("listening as %s on %s:%d%s", settings.ae_title, *server.server_address[:2],
                " (TLS)" if settings.tls else "")
    return server
