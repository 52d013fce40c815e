"""Limits of the receiving edge: PDU length and instance size, each enforced against a real peer.

(The association limit is tested in test_receive.py, test_maximum_associations.)
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, echo, store
from tests.support.wire import announced_max_pdu, associate_rq, pdu, read_pdu

NodeFactory = Callable[..., NodeProcess]


@pytest.mark.parametrize("max_pdu_size", [32768, 0])
def test_the_maximum_pdu_length_is_announced(node_factory: NodeFactory, sqlite_url: str, max_pdu_size: int) -> None:
    node = node_factory(sqlite_url, max_pdu_size=max_pdu_size)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == max_pdu_size  # as read from the A-ASSOCIATE-AC
    finally:
        assoc.release()


@pytest.mark.parametrize(("length", "receivers"), [(16385, 1), (16385, 2), (0xFFFFFFFF, 2)])
def test_a_p_data_pdu_over_the_limit_is_aborted_before_it_is_read(node_factory: NodeFactory, sqlite_url: str,
                                                                  length: int, receivers: int) -> None:
    """pynetdicom would read whatever length a header announces; the node aborts at the header."""
    node = node_factory(sqlite_url, max_pdu_size=16384, receivers=receivers)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(associate_rq())
        reply, body = read_pdu(sock)
        assert reply == 0x02 and announced_max_pdu(body) == 16384
        sock.sendall(pdu(0x04, bytes(16385), length=length))
        assert read_pdu(sock)[0] == 0x07  # A-ABORT
        assert sock.recv(1) == b""  # and the connection closed
    assert "a PDU of type 0x04" in node.log.read_text()
    assert echo(node.port).returncode == 0


def test_an_associate_request_of_gigabytes_is_aborted(node_factory: NodeFactory, sqlite_url: str) -> None:
    """Other PDU types have a fixed bound (MAX_OTHER_PDU); with no maximum length at all too."""
    node = node_factory(sqlite_url, max_pdu_size=0)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + bytes(1000))
        assert read_pdu(sock)[0] == 0x07
    assert "a PDU of type 0x01" in node.log.read_text()
    assert echo(node.port).returncode == 0


def test_a_pdu_at_the_limit_is_taken(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    """dcmtk sends PDUs of exactly the announced maximum: they pass, and so does the study."""
    make_study(tmp_path / "study", roles=("T2_AX",), slices=2, size=128)  # 32 KiB of pixels: several PDUs each
    node = node_factory(sqlite_url, max_pdu_size=4096)
    sent = store(node.port, tmp_path / "study")
    assert sent.returncode == 0, sent.stderr
    assert len(list((node.workdir / "storage").rglob("*.dcm"))) == 2


def test_an_instance_over_the_size_limit_is_refused_and_leaves_nothing(node_factory: NodeFactory, sqlite_url: str,
                                                                     tmp_path: Path) -> None:
    small = make_study(tmp_path / "small", roles=("T2_AX",), slices=1, size=16).files[0]  # about 1.5 KB
    large = make_study(tmp_path / "large", roles=("T2_AX",), slices=1, size=256).files[0]  # about 130 KB
    node = node_factory(sqlite_url, max_instance_bytes=64 * 1024)
    sent = store(node.port, [small, large], extra=["-v"])
    assert sent.returncode != 0
    assert "Store Response (Success)" in sent.stderr and "Store Response (Refused: OutOfResources)" in sent.stderr
    stored = list((node.workdir / "storage").rglob("*.dcm"))
    assert [p.name for p in stored] == [f"{_sop(small)}.dcm"]
    assert list((node.workdir / "storage" / ".incoming").iterdir()) == []
    assert node.cli("show", _study(large), check=False).returncode != 0  # no row for the large one's study
    assert "is over max_instance_bytes" in node.log.read_text()
    assert store(node.port, [small]).returncode == 0  # and the node carries on


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _study(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
