"""Waiting instead of polling, and reading in large blocks, in pynetdicom's acceptor threads.

pynetdicom 3 runs two threads per association, and both poll: the association thread sleeps
1 ms before each look at its DIMSE message queue, and the DUL thread sleeps 1 ms whenever a
look at its socket and queues found nothing (pynetdicom issues #139 and #650). On one
association every C-STORE waits out up to three of those sleeps (request read, handler
started, response sent), and every open association wakes its two threads 2000 times a second.

Here, before an acceptor association starts (:func:`make_prompt`):

- the association thread blocks on its DIMSE message queue (:class:`PromptAssociation`);
- the DUL thread blocks in ``select()`` on the peer's socket and on a :class:`Waker` that every
  primitive queued for sending sets (:class:`PromptSocket`, :class:`WakingQueue`).

Both still look at their other duties (release and abort requests, timers, being stopped) at
least every :data:`POLL_S`.

pynetdicom also reads a PDU 4096 bytes per ``recv()`` call, each a new bytes object appended to
the last: 128 system calls and copies for one 512 KiB image. :meth:`PromptSocket.recv` reads
straight into one buffer, as much as the kernel has per call.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

LOGGER = logging.getLogger(__name__)

#: Longest a waiting thread goes without looking at its other duties: it delays an association's
#: release by at most this, and costs each idle association 2/POLL_S wake-ups a second.
POLL_S = 0.005
#: Largest buffer a read allocates before the data arrives; longer PDUs grow it as they come in
#: (a header may claim up to 4 GiB when no maximum PDU length is set).
PREALLOCATE_MAX = 4 << 20
#: The DUL thread's sleep between two looks that found nothing (pynetdicom's ``_run_loop_delay``,
#: 1 ms by default): its waiting is done in :attr:`PromptSocket.ready`, so this is only a yield.
DUL_LOOP_DELAY_S = 0.0001


class Waker:
    """A self-pipe: :meth:`wake` makes it readable for ``select()`` until :meth:`drain`."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        """The readable end, for ``select()``."""
        return self._reader.fileno()

    def wake(self) -> None:
        """Make the reader readable (a full pipe already is; a closed one has nobody to wake)."""
        try:
            self._writer.send(b"\0")
        except OSError:
            pass

    def drain(self) -> None:
        """Read every pending wake-up."""
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        """Close both ends; a later :meth:`wake` does nothing."""
        self._reader.close()
        self._writer.close()


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives to send: each one put wakes the DUL thread."""

    def __init__(self, waker: Waker) -> None:
        super().__init__()
        self.waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item`` and wake the DUL thread to send it."""
        super().put(item, block, timeout)
        self.waker.wake()


class PromptSocket(AssociationSocket):
    """An association socket whose ``ready`` waits (up to POLL_S) for data from the peer or for a
    primitive to send, instead of answering at once and leaving the DUL thread to sleep."""

    waker: Waker

    @property
    def ready(self) -> bool:
        """True if the peer's data can be read; returns early when a primitive is queued to send."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes that select() cannot see
        try:
            peer, waker = sock.fileno(), self.waker.fileno()
            readable, _, _ = select.select([peer, waker], [], [], POLL_S)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom's: the transport connection is closed
            return False
        if waker in readable:
            self.waker.drain()
        return peer in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer if the peer closes first, as pynetdicom's), blocking."""
        return recv_exactly(cast(socket.socket, self.socket), nr_bytes)

    def close(self) -> None:
        """Close the connection and the waker."""
        super().close()
        self.waker.close()


def recv_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``sock``, or what came before the peer closed: read into one buffer,
    allocated up to PREALLOCATE_MAX at first and doubled while more is owed."""
    buf = bytearray(min(nr_bytes, PREALLOCATE_MAX))
    got = 0
    while got < nr_bytes:
        if got == len(buf):
            buf.extend(bytes(min(nr_bytes - got, len(buf))))
        with memoryview(buf) as view:
            count = sock.recv_into(view[got:])
        if not count:
            break
        got += count
    del buf[got:]
    return buf


class PromptAssociation(Association):
    """An acceptor association whose thread waits on its DIMSE message queue."""

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (3.0), with its 1 ms sleep replaced by a wait for the next
        DIMSE message of up to POLL_S."""
        self._is_paused = False
        while not self._kill:
            # as pynetdicom's: the reactor may be paused while the acceptor sends a request
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=POLL_S)
            except queue.Empty:
                msg = None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as pynetdicom's
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():  # pynetdicom's default answer, A-ABORT (we keep it)
                LOGGER.error("aborting the association from %s: nothing received for %s s (network timeout)",
                             self.requestor.address, self.network_timeout)
                self.abort()
                self.kill()
                return


def end_prompt(assoc: Association) -> None:
    """Close the waker of an association made prompt, once its connection is over."""
    sock = assoc.dul.socket
    if isinstance(sock, PromptSocket) and hasattr(sock, "waker"):
        sock.waker.close()


def make_prompt(assoc: Association) -> None:
    """Make a new acceptor association (socket set, threads not started) wait instead of poll."""
    if not assoc.is_acceptor or assoc.dul.is_alive():
        raise ValueError("only an acceptor association that has not started can be made prompt")
    waker = Waker()
    assoc.__class__ = PromptAssociation
    assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S
    assoc.dul.to_provider_queue = WakingQueue(waker)
    sock = assoc.dul.socket
    if not isinstance(sock, PromptSocket):
        raise TypeError("the association's socket must be a PromptSocket")
    sock.waker = waker
