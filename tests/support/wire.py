"""DICOM Upper Layer PDUs and Explicit VR Little Endian elements written byte by byte, so that
any field can be wrong: what the fuzz campaign and the receiving tests send over raw sockets."""

from __future__ import annotations

import random
import socket
import struct
import time

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

CALLED = "SPINENODE"
CALLING = "FUZZ"
PDU_NAMES = {1: "rq", 2: "ac", 3: "rj", 4: "data", 5: "release-rq", 6: "release-rp", 7: "abort"}
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 32-bit big-endian length (the body's unless given), body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(calling: str = CALLING, called: str = CALLED, max_pdu: int = 0,
                 contexts: tuple[tuple[int, str], ...] = ((1, MRImageStorage), (3, Verification))) -> bytes:
    """An A-ASSOCIATE-RQ proposing each (context id, abstract syntax) in Explicit VR Little Endian."""
    proposed = b"".join(_item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, uid.encode()) + _item(0x40, ExplicitVRLittleEndian.encode()))
                        for cid, uid in contexts)
    user = _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1234.1"))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + proposed + user)
    return pdu(0x01, body)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: length, context id, message control header, data."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*items: bytes) -> bytes:
    """A P-DATA-TF PDU holding ``items``."""
    return pdu(0x04, b"".join(items))


def store_command(sop_instance_uid: str, sop_class_uid: str = MRImageStorage, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, group length first), with a dataset."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class_uid
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance_uid
    body = encode(cmd, True, True) or b""
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def store_pdus(command: bytes, dataset: bytes, fragment: int, context_id: int = 1) -> list[bytes]:
    """A whole C-STORE-RQ as P-DATA-TF PDUs: the command, then the dataset in ``fragment``-byte PDVs."""
    pieces = [dataset[i:i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    return [p_data(pdv(context_id, 0x03, command))] + [
        p_data(pdv(context_id, 0x02 if i == len(pieces) - 1 else 0x00, piece)) for i, piece in enumerate(pieces)]


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from the node: (type, body); (0, b"") if it closed first."""
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 65536))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def announced_max_pdu(ac_body: bytes) -> int | None:
    """The Maximum Length sub-item (0x51) of an A-ASSOCIATE-AC's user information, if there."""
    at = 68
    while at + 4 <= len(ac_body):
        item_type, length = ac_body[at], struct.unpack(">H", ac_body[at + 2:at + 4])[0]
        if item_type == 0x50:
            sub = at + 4
            while sub + 4 <= at + 4 + length:
                sub_type, sub_length = ac_body[sub], struct.unpack(">H", ac_body[sub + 2:sub + 4])[0]
                if sub_type == 0x51 and sub_length == 4:
                    return int(struct.unpack(">L", ac_body[sub + 4:sub + 8])[0])
                sub += 4 + sub_length
        at += 4 + length
    return None


def response_status(body: bytes) -> int | None:
    """The Status (0000,0900) of the command set in a P-DATA-TF body, if it holds one."""
    data = body[6:]  # one PDV: length, context id, control header
    at = data.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
    return int(struct.unpack("<H", data[at + 8:at + 10])[0]) if at >= 0 else None



def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, as a crashed or unplugged peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def finish(sock: socket.socket, timeout: float) -> str:
    """Stop sending and read until the node closes or aborts (after an A-ABORT the requestor is
    the one to close, PS3.8 9.1.4): the PDUs it answered with, ``closed`` if none, ``hung`` if it
    does neither within ``timeout`` seconds."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    received, deadline = bytearray(), time.monotonic() + timeout
    while not _ends_with_abort(bytes(received)):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return "hung"
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return _pdu_names(bytes(received)) or "closed"


def _ends_with_abort(data: bytes) -> bool:
    """True if ``data`` ends with a whole A-ABORT PDU."""
    return len(data) >= 10 and data[-10:-4] == b"\x07\x00\x00\x00\x00\x04"


def _pdu_names(data: bytes) -> str:
    names: list[str] = []
    at = 0
    while at + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBL", data[at:at + 6])
        name = PDU_NAMES.get(pdu_type, "unknown")
        if not names or names[-1] != name:
            names.append(name)
        at += 6 + length
    return "+".join(names)

def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the declared length."""
    declared = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, declared & 0xFFFFFFFF) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, declared & 0xFFFF) + value


def split_elements(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The top-level elements of an Explicit VR Little Endian dataset with defined lengths, as
    (tag, VR, value)."""
    found, at = [], 0
    while at + 8 <= len(data):
        group, elem, vr = struct.unpack("<HH2s", data[at:at + 6])
        if vr in LONG_VRS:
            (length,), start = struct.unpack("<L", data[at + 8:at + 12]), at + 12
        else:
            (length,), start = struct.unpack("<H", data[at + 6:at + 8]), at + 8
        found.append(((group << 16) | elem, vr, data[start:start + length]))
        at = start + length
    return found


def join_elements(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    return b"".join(element(tag, vr, value) for tag, vr, value in elements)


def deep_sequence(rng: random.Random, depth: int) -> bytes:
    """A sequence nested ``depth`` levels, with undefined or defined lengths."""
    inner = element(0x00100010, b"PN", b"DEEP")
    undefined = rng.random() < 0.5
    for _ in range(depth):
        if undefined:
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
            inner = element(0x00081115, b"SQ", item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", length=0xFFFFFFFF)
        else:
            item = b"\xfe\xff\x00\xe0" + struct.pack("<L", len(inner)) + inner
            inner = element(0x00081115, b"SQ", item)
    return inner
