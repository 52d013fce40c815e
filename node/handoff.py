"""Several receiving processes behind one port: an acceptor hands each connection to the least busy.

SO_REUSEPORT would let every process accept for itself, but the kernel spreads connections by a
hash, and a PACS opens only a handful: four associations often land 3:1 or 4:0 on two processes.
So the node's main process accepts, and passes each socket (SCM_RIGHTS) to the receiving process
with the fewest open associations; each receiver reports back when a connection it was handed
is closed, however its association ended (pynetdicom's own events miss some ways).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

from sqlalchemy import Engine

from node.config import Settings
from node.db import make_engine
from node.logs import configure_logging
from node.metrics import Refusal, refuse_association
from node.scp import ConnectionHandler, ReceiverServer, make_ae, make_ssl_context, scp_handlers
from node.store import InstanceStore

LOGGER = logging.getLogger(__name__)

ASSOCIATION_ENDED = b"e"
#: Seconds a caller has to finish its TLS handshake.
HANDSHAKE_TIMEOUT_S = 15.0


class Dispatcher:
    """Accepts on the node's port and hands each connection to the least busy receiving process."""

    def __init__(self, settings: Settings, receivers: Sequence[tuple[BaseProcess, Connection]]) -> None:
        if not receivers:
            raise ValueError("receivers must not be empty")
        self.receivers = receivers
        self.loads = [0] * len(receivers)
        self._next = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server((settings.host, settings.port), backlog=64)
        self.listener.settimeout(0.5)
        self._stopped = threading.Event()
        threading.Thread(target=self._accept_loop, name="dispatch-accept", daemon=True).start()
        for index, (_, pipe) in enumerate(receivers):
            threading.Thread(target=self._count_ended, args=(index, pipe), name=f"dispatch-count-{index}", daemon=True).start()
        LOGGER.info("listening as %s on %s:%d, handing connections to %d receiving processes",
                    settings.ae_title, settings.host, settings.port, len(receivers))

    @property
    def processes(self) -> list[BaseProcess]:
        """The receiving processes, in order."""
        return [process for process, _ in self.receivers]

    def close(self) -> None:
        """Stop accepting (the receivers finish what they hold)."""
        self._stopped.set()
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, address = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                LOGGER.exception("accept failed; trying again")  # e.g. out of file descriptors
                self._stopped.wait(0.1)
                continue
            with conn:
                index = self._pick()
                process, pipe = self.receivers[index]
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    reduction.send_handle(pipe, conn.fileno(), process.pid)
                except OSError:  # the receiver is gone (the node stops on its next liveness check)
                    LOGGER.exception("could not hand a connection to %s", process.name)
                    self._ended(index)
                    continue
            LOGGER.info("connection from %s handed to %s", address[0], process.name)

    def _pick(self) -> int:
        """The receiver with the fewest open associations; ties go round the receivers in turn."""
        with self._lock:
            count = len(self.loads)
            order = [(self._next + k) % count for k in range(count)]
            index = min(order, key=lambda i: self.loads[i])
            self.loads[index] += 1
            self._next = (index + 1) % count
            return index

    def _count_ended(self, index: int, pipe: Connection) -> None:
        while True:
            try:
                pipe.recv_bytes()
            except (EOFError, OSError):
                return
            self._ended(index)

    def _ended(self, index: int) -> None:
        with self._lock:
            self.loads[index] = max(0, self.loads[index] - 1)


class HandoffServer(ReceiverServer):
    """A receiving server that listens on nothing: its connections arrive from the dispatcher."""

    accepts = False
    #: Called when a connection handed over is closed (the dispatcher counts open ones).
    on_end: Callable[[], None] | None = None

    def connection_ended(self) -> None:
        """Report the end of a connection, however its association ended."""
        if self.on_end is not None:
            self.on_end()

    def server_bind(self) -> None:
        """No socket of its own to bind."""

    def server_activate(self) -> None:
        """Nothing to listen on."""

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Do the TLS handshake here, in the connection's own thread, then serve the association."""
        ssl_context = self.ssl_context
        if ssl_context is not None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT_S)  # a peer that never finishes the handshake
                request = ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except OSError as exc:
                refuse_association(Refusal.TLS_HANDSHAKE)
                LOGGER.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                request.close()
                self.connection_ended()
                return
        super().process_request_thread(request, client_address)

    def take(self, conn: socket.socket) -> None:
        """Serve a connection handed over; one whose peer is already gone is closed and counted."""
        try:
            address = conn.getpeername()
        except OSError:  # reset by the peer between the dispatcher's accept and now
            LOGGER.info("a connection was reset by its peer before it could be served")
            conn.close()
            self.connection_ended()
            return
        try:
            self.process_request(conn, address)
        except Exception:  # e.g. no thread could be started: this connection fails, the next may not
            LOGGER.exception("could not serve the connection from %s", address[0])
            conn.close()
            self.connection_ended()


def run_receiver(settings: Settings, pipe: Connection, parent_pid: int) -> None:
    """Entry point of a receiving process: serve what the dispatcher hands over until told to stop."""
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = make_engine(settings.database_url)
    try:
        _serve_handoffs(settings, engine, pipe, parent_pid, stop)
    finally:
        engine.dispose()


def _serve_handoffs(settings: Settings, engine: Engine, pipe: Connection, parent_pid: int, stop: threading.Event) -> None:
    store = InstanceStore(settings, engine)
    report = threading.Lock()

    def ended() -> None:
        with report:
            pipe.send_bytes(ASSOCIATION_ENDED)

    server = cast(HandoffServer, make_ae(settings).make_server(
        (settings.host, 0),
        evt_handlers=scp_handlers(settings, store),
        ssl_context=make_ssl_context(settings),
        server_class=HandoffServer,
        request_handler=ConnectionHandler,
    ))
    server.on_end = ended

    def take_handoffs() -> None:
        while not stop.is_set():
            try:
                fd = reduction.recv_handle(pipe)
            except (EOFError, OSError):
                stop.set()  # the node's main process is gone
                return
            server.take(socket.socket(fileno=fd))

    threading.Thread(target=take_handoffs, name="take-handoffs", daemon=True).start()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            break
    server.stop()
    store.close()
