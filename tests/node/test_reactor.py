"""The acceptor's waiting threads (node.reactor): they still do what pynetdicom's polling ones did.

C-ECHO and C-STORE through them are exercised by every test that sends to a node; these check
what only a waiting thread could miss: a wake-up, a release, a peer gone silent.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Iterator
from typing import cast

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import load_settings
from node.reactor import PromptAssociation, Waker, make_prompt, recv_exactly
from node.scp import ConnectionHandler, ReceiverServer, handle_echo, make_ae
from tests.support.services import wait_for
from tests.support.wire import associate_rq, read_pdu

NETWORK_TIMEOUT_S = 0.5


def readable(waker: Waker) -> bool:
    """True if ``select()`` sees the waker readable right now."""
    return bool(select.select([waker], [], [], 0)[0])


def test_a_waker_is_readable_from_wake_until_drained() -> None:
    waker = Waker()
    assert not readable(waker)
    waker.wake()
    waker.wake()
    assert readable(waker)
    waker.drain()
    assert not readable(waker)
    waker.close()
    waker.wake()  # nobody left to wake: no error


def test_recv_exactly_reads_across_sends_and_stops_where_the_peer_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PDU sent in pieces comes back whole; a peer that closes early leaves what it sent; a
    body longer than the first allocation grows the buffer."""
    monkeypatch.setattr("node.reactor.PREALLOCATE_MAX", 1000)
    data = bytes(range(256)) * 40  # 10240 bytes
    ours, peer = socket.socketpair()
    with ours, peer:
        for at in range(0, 6000, 1500):
            peer.sendall(data[at:at + 1500])
        peer.sendall(data[6000:])
        assert recv_exactly(ours, len(data)) == data
        peer.sendall(data[:700])
        peer.close()
        assert recv_exactly(ours, 4000) == data[:700]
        assert recv_exactly(ours, 0) == b""


@pytest.fixture
def server() -> Iterator[ReceiverServer]:
    """An echo-only receiving server in this process, with a short network timeout."""
    ae = make_ae(load_settings(ae_title="SPINENODE"))
    ae.network_timeout = NETWORK_TIMEOUT_S
    srv = cast(ReceiverServer, ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_ECHO, handle_echo)],
                                              server_class=ReceiverServer, request_handler=ConnectionHandler))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.stop(grace_s=0)


def test_an_association_is_served_released_and_ended(server: ReceiverServer) -> None:
    """Echo, then release: the acceptor answers both, is a prompt one, and its threads end."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="SPINENODE")
    assert assoc.is_established
    acceptors = wait_for(lambda: server.active_associations, 10, "the acceptor association")
    assert all(isinstance(a, PromptAssociation) for a in acceptors)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    wait_for(lambda: not any(a.is_alive() for a in acceptors), 10, "the acceptor's threads to end")


def test_a_silent_peer_is_aborted_after_the_network_timeout(server: ReceiverServer, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that associates and then says nothing is aborted once network_timeout passes."""
    with caplog.at_level(logging.ERROR, logger="node.reactor"), socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        assert read_pdu(sock)[0] == 0x07  # A-ABORT, NETWORK_TIMEOUT_S later
    assert "network timeout" in caplog.text


def test_only_an_acceptor_that_has_not_started_can_be_made_prompt() -> None:
    requestor = Association(AE(), "requestor")
    with pytest.raises(ValueError, match="acceptor"):
        make_prompt(requestor)
