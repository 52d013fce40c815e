"""Fuzzing the receiving edge: hostile traffic on loopback against a running node, nothing lost.

Run it from the repository root::

    .venv/bin/python -m bench.fuzz --minutes 10                  # or: make fuzz
    .venv/bin/python -m bench.fuzz --cases 300 --seed 7 --json bench/out/fuzz.json

It starts a real ``spine-node serve`` (two receiving processes behind the hand-off, SQLite, a
broker that is not there so nothing is graded, ``max_pdu_size`` and ``max_instance_bytes`` set
low enough to be crossed) and sends it, round the families in turn, cases drawn from a seeded
generator (case N of seed S is always the same bytes):

- ``pdu``: raw PDUs over a socket: random bytes and PDU types, wrong, short and huge length
  fields, truncated and mutated A-ASSOCIATE-RQs, garbage after a valid association, P-DATA with
  bad PDV headers, release and abort at odd moments, a P-DATA-TF longer than the maximum the
  node announced, and valid C-STOREs cut into random fragments;
- ``vanish``: connections that open and vanish (FIN or RST): before a byte, inside a PDU header,
  after the A-ASSOCIATE-RQ, after the association, inside the P-DATA stream of a C-STORE, and
  right after a whole C-STORE without waiting for its answer;
- ``dataset``: hostile datasets through a real pynetdicom SCU, sent as raw bytes so nothing on
  the way sanitises them: bytes flipped, truncated, wrong and unknown VRs, overlong values, bad
  and missing UIDs, huge declared lengths, deep sequences, duplicate and unordered elements,
  non-ASCII text, a SOP Instance UID already acknowledged with other contents, and instances
  over ``max_instance_bytes``.

After every case a well-formed MR instance goes through a real SCU; each one acknowledged with
success is remembered, and the node and both receiving processes must still be alive. Every 30 s
a progress line gives the fd delta and temp files; at the end, once the node is quiet, the
campaign checks that their open file descriptors are back to the baseline, that
``storage_dir/.incoming`` is empty, that every acknowledged well-formed instance is indexed and on
disk with the bytes that were sent, that no file on disk lacks its row, and that SIGTERM stops
the node with exit code 0.

File descriptors are counted per process and by kind. Sockets, pipes and other files must be
back to the baseline exactly and no stored file may be held open; the one slack allowed is the
database's: SQLAlchemy keeps up to ``DB_POOL_SIZE`` SQLite connections per process (each holds
the database file, its -wal and its -shm), opened as concurrency first asks for them, so database
fds may exceed the baseline up to that bound.

The summary gives the cases per family and kind, the outcomes (DICOM statuses such as 0x0000,
0xA700, 0xA900, 0xC210; the PDUs the node answered a raw case with, e.g. ``ac+abort``; ``closed``
when it just closed; ``vanished``), crashes, hung cases, fd deltas, temp files and lost
instances, and the tracebacks in the node's log by who wrote them. Exit status 1 if anything
crashed, hung, leaked or was lost, a well-formed instance was refused, an instance got 0xC211
(an internal error), or the node's own code logged a traceback or lost a thread to one. Tracebacks
that pynetdicom logs while it refuses malformed PDUs, and its reactor threads that die on some
(the connection is then closed), are reported but are not the node's failures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from sqlalchemy import create_engine, select

from bench.common import interrupt
from node.schema import Instance
from tests.support.dicomgen import make_study
from tests.support.services import UNREACHABLE_BROKER, NodeProcess, children_of, dataset_bytes
from tests.support.wire import (
    CALLED, CALLING, LONG_VRS, PDU_NAMES, associate_rq, deep_sequence, element, finish, join_elements, p_data, pdu,
    pdv, read_pdu, reset, response_status, split_elements, store_command, store_pdus,
)

#: What the fuzzed node announces and enforces: low, so the campaign crosses both cheaply.
MAX_PDU = 65536
MAX_INSTANCE = 1 << 20
#: A raw case whose connection the node has not closed this long after we stopped sending hung.
HANG_S = 20.0
#: SQLAlchemy's QueuePool size (its default, node.db keeps it for SQLite): the database fd slack.
DB_POOL_SIZE = 5
FDS_PER_SQLITE_CONNECTION = 3
CHECK_EVERY_S = 30.0
FAMILIES = ("pdu", "vanish", "dataset")

VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OW", b"PN",
       b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL", b"UN", b"US", b"UT", b"UC", b"UR", b"OV", b"SV"]
UID_TAGS = {"StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E, "SOPInstanceUID": 0x00080018,
            "SOPClassUID": 0x00080016}
HOSTILE_UIDS = [b"", b"1.2.abc", b"../../../../tmp/x", b"1." * 40 + b"1", b"\x00\x00", b"1.2.3\\1.2.4", "1.2.\u00e9".encode(),
                b"1.02.3", b"1..2", b".1.2", b"1.2.", b" " * 8, b"9" * 64, b"1.2.3" + b"\xff" * 3, b"2.25." + b"1" * 80]


# -- raw connections -------------------------------------------------------------------------


@contextmanager
def connect(port: int) -> Iterator[socket.socket]:
    """A TCP connection to the node, Nagle off; closed (FIN) on the way out if still open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield sock
    finally:
        sock.close()


def send(sock: socket.socket, data: bytes) -> bool:
    """Send what the node will still take; False once it has closed on us."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def establish(sock: socket.socket, max_pdu: int = 0) -> bool:
    """Associate over a raw socket (MR Image Storage as context 1, Verification as 3)."""
    sock.sendall(associate_rq(max_pdu=max_pdu))
    return read_pdu(sock)[0] == 0x02


# -- datasets made hostile, element by element ------------------------------------------------


class Mutations:
    """Ways to make a well-formed dataset hostile; each takes and returns the element list, or
    gives up on the list and returns raw bytes."""

    def __init__(self, acknowledged: list[str]) -> None:
        self.acknowledged = acknowledged

    def all(self) -> list[Callable[[random.Random, list[tuple[int, bytes, bytes]]], Any]]:
        return [self.wrong_vr, self.unknown_vr, self.overlong_value, self.bad_uid, self.missing_uid, self.huge_length,
                self.undefined_length, self.deep_sequence, self.duplicate, self.reorder, self.non_ascii, self.reuse_uid,
                self.odd_private, self.flip_bytes, self.truncate, self.implicit_bytes, self.random_bytes, self.oversize]

    @staticmethod
    def wrong_vr(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        i = rng.randrange(len(els))
        els[i] = (els[i][0], rng.choice(VRS), els[i][2])
        return els

    @staticmethod
    def unknown_vr(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        i = rng.randrange(len(els))
        els[i] = (els[i][0], bytes([rng.randrange(256), rng.randrange(256)]), els[i][2])
        return els

    @staticmethod
    def overlong_value(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        i = rng.randrange(len(els))
        size = rng.choice([65, 1025, 65535, 70000, 300000])
        els[i] = (els[i][0], els[i][1] if els[i][1] in LONG_VRS or size < 65536 else b"UT", bytes(rng.choice(b"A1.\\ ") for _ in range(64)) * (size // 64))
        return els

    @staticmethod
    def bad_uid(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        tag = rng.choice(list(UID_TAGS.values()) + [0x00200052])
        return [(t, vr, rng.choice(HOSTILE_UIDS) if t == tag else v) for t, vr, v in els]

    @staticmethod
    def missing_uid(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        tag = rng.choice(list(UID_TAGS.values()))
        return [e for e in els if e[0] != tag]

    @staticmethod
    def huge_length(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        i = rng.randrange(len(els))
        tag, vr, value = els[i]
        length = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, len(value) + 1, len(value) + 4096, 0xFFFF, 0xFFF1])
        return join_elements(els[:i]) + element(tag, vr, value, length=length) + join_elements(els[i + 1:])

    @staticmethod
    def undefined_length(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        i = rng.randrange(len(els))
        tag, _, value = els[i]
        end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" if rng.random() < 0.5 else b""
        return join_elements(els[:i]) + element(tag, rng.choice([b"UN", b"OB", b"SQ"]), value + end, length=0xFFFFFFFF) + join_elements(els[i + 1:])

    @staticmethod
    def deep_sequence(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        depth = rng.choice([8, 64, 200, 600, 2000])
        before = [e for e in els if e[0] < 0x00081115]
        return join_elements(before) + deep_sequence(rng, depth) + join_elements([e for e in els if e[0] > 0x00081115])

    @staticmethod
    def duplicate(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        i = rng.randrange(len(els))
        tag, vr, _ = els[i]
        els.insert(i + 1, (tag, vr, rng.choice([els[i][2], b"1.2.3.4", b"OTHER", b""])))
        return els

    @staticmethod
    def reorder(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        i, j = rng.randrange(len(els)), rng.randrange(len(els))
        els[i], els[j] = els[j], els[i]
        return els

    @staticmethod
    def non_ascii(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        charset = rng.choice([b"ISO_IR 192", b"ISO_IR 100", b"ISO_IR 999", b"\\ISO 2022 IR 87", b"GB18030", b"\xff\xfe"])
        text = rng.choice(["M\u00fcller^J\u00fcrgen", "\u5c71\u7530^\u592a\u90ce", "\U0001f480"]).encode()
        garbage = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 40)))
        value = rng.choice([text, garbage, text[:-1]])
        changed = {0x00080005: charset, 0x00100010: value, 0x0008103E: value, 0x00080070: value}
        tags = {t for t, _, _ in els}
        els = [(t, vr, changed.get(t, v)) for t, vr, v in els]
        if 0x00080005 not in tags:
            els.insert(0, (0x00080005, b"CS", charset))
        return els

    def reuse_uid(self, rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        if not self.acknowledged:
            return els
        taken = rng.choice(self.acknowledged).encode()
        return [(t, vr, taken if t == UID_TAGS["SOPInstanceUID"] else v) for t, vr, v in els]

    @staticmethod
    def odd_private(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        private = [(0x00290010, b"LO", b"FUZZ"), (0x00291001, rng.choice(VRS), bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 7, 255]))))]
        return sorted(els + private)

    @staticmethod
    def flip_bytes(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        data = bytearray(join_elements(els))
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    @staticmethod
    def truncate(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        data = join_elements(els)
        return data[:rng.randrange(0, len(data))]

    @staticmethod
    def implicit_bytes(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        return b"".join(struct.pack("<HHL", t >> 16, t & 0xFFFF, len(v)) + v for t, _, v in els)

    @staticmethod
    def random_bytes(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> bytes:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 100, 4000])))

    @staticmethod
    def oversize(rng: random.Random, els: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        pixels = [e for e in els if e[0] == 0x7FE00010]
        extra = MAX_INSTANCE + rng.choice([1, 4096, MAX_INSTANCE])
        return [e for e in els if e[0] != 0x7FE00010] + [(0x7FE00010, b"OW", (pixels[0][2] if pixels else b"") + bytes(extra + extra % 2))]


# -- the instances, the senders --------------------------------------------------------------


class Instances:
    """Well-formed MR instances from one template (fresh UIDs each; a new study every 25)."""

    def __init__(self, workdir: Path) -> None:
        template = make_study(workdir / "template", roles=("T2_SAG",), slices=1, size=16).files[0]
        self.ds = dcmread(template)
        self.path = workdir / "instance.dcm"
        self.count = 0

    def next(self) -> Dataset:
        """The template with a new SOP Instance UID (and a new study and series now and then)."""
        if self.count % 25 == 0:
            self.ds.StudyInstanceUID, self.ds.SeriesInstanceUID = generate_uid(), generate_uid()
        self.count += 1
        self.ds.SOPInstanceUID = self.ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return self.ds

    def write(self, ds: Dataset) -> Path:
        """``ds`` as a file, the bytes a sender would stream."""
        ds.save_as(self.path, enforce_file_format=True)
        return self.path

    def write_raw(self, data: bytes, sop_class_uid: str, sop_instance_uid: str) -> Path:
        """A file whose file meta is valid and whose dataset is ``data``, byte for byte."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1234.1")
        out = DicomBytesIO()
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        self.path.write_bytes(out.getvalue() + data)
        return self.path

    @staticmethod
    def encoded(ds: Dataset) -> bytes:
        """``ds`` without its file meta, Explicit VR Little Endian."""
        return encode(ds, False, True) or b""


class Sender:
    """A real pynetdicom SCU that streams files as they are (no decoding, no re-encoding)."""

    def __init__(self, port: int) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.port = port
        self.ae = AE(ae_title=CALLING)
        for sop_class in (MRImageStorage, CTImageStorage):
            self.ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = HANG_S

    def store(self, path: Path) -> str:
        """C-STORE one file: its status as ``0xNNNN``, or how the association ended instead."""
        started = time.monotonic()
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=CALLED)
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "aborted"
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" in status:
            return f"0x{int(status.Status):04X}"
        return "hung" if time.monotonic() - started >= HANG_S - 1 else "aborted"


# -- the families of cases -------------------------------------------------------------------


@dataclass
class Context:
    """What the cases need: the node's port and the instances, and what was acknowledged."""

    port: int
    instances: Instances
    sender: Sender
    acknowledged: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> sha256 of the dataset sent


Case = Callable[[random.Random, Context], str]


def pdu_garbage(rng: random.Random, ctx: Context) -> str:
    """Random bytes, sometimes led by a real PDU type."""
    with connect(ctx.port) as sock:
        lead = bytes([rng.choice([1, 4, 7, 0, 0xFF])]) if rng.random() < 0.5 else b""
        send(sock, lead + bytes(rng.randrange(256) for _ in range(rng.choice([1, 5, 6, 100, 8192]))))
        return finish(sock, HANG_S)


def pdu_random_type(rng: random.Random, ctx: Context) -> str:
    """A PDU of a random or real type whose length field is exact, short, long or huge."""
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 10, 68, 300])))
    length = rng.choice([None, 0, max(0, len(body) - 3), len(body) + 1000, 0xFFFFFFFF, 0x7FFFFFFF])
    with connect(ctx.port) as sock:
        send(sock, pdu(rng.randrange(256) if rng.random() < 0.5 else rng.randrange(1, 8), body, length))
        return finish(sock, HANG_S)


def pdu_truncated_rq(rng: random.Random, ctx: Context) -> str:
    """An A-ASSOCIATE-RQ cut anywhere."""
    rq = associate_rq()
    with connect(ctx.port) as sock:
        send(sock, rq[:rng.randrange(1, len(rq))])
        return finish(sock, HANG_S)


def pdu_mutated_rq(rng: random.Random, ctx: Context) -> str:
    """An A-ASSOCIATE-RQ with bytes flipped, odd AE titles, odd contexts or maximum lengths."""
    choice = rng.randrange(4)
    if choice == 0:
        rq = bytearray(associate_rq())
        for _ in range(rng.randrange(1, 7)):
            rq[rng.randrange(6, len(rq))] = rng.randrange(256)
        data = bytes(rq)
    elif choice == 1:
        data = associate_rq(calling=rng.choice(["", " " * 16, "\u00e9\u00e8", "A" * 17, "\x00"]))
    elif choice == 2:
        contexts = tuple((rng.randrange(256), rng.choice([MRImageStorage, "1.2.3", "", "x" * 64])) for _ in range(rng.choice([0, 1, 128, 300])))
        data = associate_rq(contexts=contexts)
    else:
        data = associate_rq(max_pdu=rng.choice([1, 2, 6, 0xFFFFFFFF]))
    with connect(ctx.port) as sock:
        send(sock, data)
        return finish(sock, HANG_S)


def pdu_garbage_after_association(rng: random.Random, ctx: Context) -> str:
    """Random bytes once associated."""
    with connect(ctx.port) as sock:
        establish(sock)
        send(sock, bytes(rng.randrange(256) for _ in range(rng.choice([1, 6, 50, 5000]))))
        return "ac+" + finish(sock, HANG_S)


def pdu_bad_pdv(rng: random.Random, ctx: Context) -> str:
    """A P-DATA-TF whose PDV items are malformed, or whose command set is."""
    command = store_command(generate_uid())
    bad = rng.choice([
        pdu(0x04, struct.pack(">L", 0)),  # a PDV of length 0
        pdu(0x04, struct.pack(">LB", 1, 1)),  # length 1: no control header
        pdu(0x04, struct.pack(">LBB", 5000, 1, 3) + command),  # longer than the PDU
        p_data(pdv(99, 0x03, command)),  # a context that was not negotiated
        p_data(pdv(1, rng.randrange(256), command)),
        p_data(pdv(1, 0x02, Instances.encoded(ctx.instances.ds))),  # a dataset before any command
        p_data(pdv(1, 0x03, bytes(rng.randrange(256) for _ in range(40)))),  # a command set of noise
        p_data(pdv(1, 0x03, command.replace(b"\x00\x01\x02\x00\x01\x00", b"\x00\x01\x02\x00\xff\x0f"))),
        p_data(),  # no PDV at all
        p_data(pdv(1, 0x01, command[:20])) + p_data(pdv(1, 0x02, b"\x08\x00")),  # command never finished
    ])
    with connect(ctx.port) as sock:
        establish(sock)
        send(sock, bad)
        return "ac+" + finish(sock, HANG_S)


def pdu_odd_release(rng: random.Random, ctx: Context) -> str:
    """Release and abort at odd moments: twice, unasked, inside a C-STORE, with odd values."""
    release, abort = pdu(0x05, bytes(4)), pdu(0x07, bytes([0, 0, rng.randrange(4), rng.randrange(8)]))
    command = store_command(generate_uid())
    data = rng.choice([
        release + release,
        abort,
        associate_rq(),
        pdu(0x06, bytes(4)),  # a release answer nobody asked for
        p_data(pdv(1, 0x03, command)) + release,  # release inside a C-STORE
        p_data(pdv(1, 0x03, command), pdv(1, 0x00, b"\x08\x00")) + abort,
        pdu(0x05, bytes(4), length=0xFFFF),
    ])
    with connect(ctx.port) as sock:
        establish(sock)
        send(sock, data)
        return "ac+" + finish(sock, HANG_S)


def pdu_oversized(rng: random.Random, ctx: Context) -> str:
    """A P-DATA-TF longer than the node's maximum: announced only, or sent in full."""
    length = rng.choice([MAX_PDU + 1, MAX_PDU * 4, 0x7FFFFFFF, 0xFFFFFFFF])
    with connect(ctx.port) as sock:
        establish(sock)
        body = bytes(min(length, MAX_PDU * 4)) if rng.random() < 0.5 else b""
        send(sock, struct.pack(">BBL", 4, 0, length) + body)
        return "ac+" + finish(sock, HANG_S)


def pdu_fragmented_store(rng: random.Random, ctx: Context) -> str:
    """A valid C-STORE in random PDV sizes over raw PDUs; its success is remembered."""
    ds = ctx.instances.next()
    dataset = Instances.encoded(ds)
    with connect(ctx.port) as sock:
        if not establish(sock, max_pdu=rng.choice([0, 4096, 16384])):
            return "no-ac"
        for data in store_pdus(store_command(ds.SOPInstanceUID), dataset, rng.choice([1, 2, 7, 100, 1000, 4000])):
            send(sock, data)
        reply_type, body = read_pdu(sock)
        status = response_status(body) if reply_type == 0x04 else None
        send(sock, pdu(0x05, bytes(4)))
        finish(sock, HANG_S)
    if status == 0:
        ctx.acknowledged[ds.SOPInstanceUID] = hashlib.sha256(dataset).hexdigest()
    return f"0x{status:04X}" if status is not None else PDU_NAMES.get(reply_type, "closed")


def leave(rng: random.Random, sock: socket.socket) -> str:
    """Go as a crashed peer (RST) or a rude one (FIN), half each; says which."""
    if rng.random() < 0.5:
        reset(sock)
        return "rst"
    sock.close()
    return "fin"


def vanish_before(rng: random.Random, ctx: Context) -> str:
    """Connect, maybe send part of a PDU header, and go (FIN or RST)."""
    with connect(ctx.port) as sock:
        send(sock, associate_rq()[:rng.choice([0, 0, 1, 3, 5])])
        time.sleep(rng.choice([0, 0, 0.05, 0.3]))
        return leave(rng, sock)


def vanish_after_rq(rng: random.Random, ctx: Context) -> str:
    """Send an A-ASSOCIATE-RQ (whole or in part), maybe read the answer, and go."""
    with connect(ctx.port) as sock:
        rq, whole = associate_rq(), rng.random() < 0.7
        send(sock, rq if whole else rq[:rng.randrange(6, len(rq))])
        if whole and rng.random() < 0.5:
            read_pdu(sock)
        return leave(rng, sock)


def vanish_mid_store(rng: random.Random, ctx: Context) -> str:
    """Associate, send part of a C-STORE (perhaps stopping inside a PDU), and go."""
    ds = ctx.instances.next()
    stream = b"".join(store_pdus(store_command(ds.SOPInstanceUID), Instances.encoded(ds), rng.choice([100, 1000, 4000])))
    with connect(ctx.port) as sock:
        establish(sock)
        send(sock, stream[:rng.randrange(1, len(stream))])
        return leave(rng, sock)


def vanish_after_store(rng: random.Random, ctx: Context) -> str:
    """Send a whole C-STORE and go without waiting for its answer (not counted as acknowledged)."""
    ds = ctx.instances.next()
    with connect(ctx.port) as sock:
        establish(sock)
        for data in store_pdus(store_command(ds.SOPInstanceUID), Instances.encoded(ds), 4000):
            send(sock, data)
        return leave(rng, sock)


def dataset_hostile(rng: random.Random, ctx: Context) -> str:
    """One to three mutations of a fresh instance, sent through a real SCU."""
    ds = ctx.instances.next()
    mutations = Mutations(list(ctx.acknowledged)).all()
    data: Any = split_elements(Instances.encoded(ds))
    for mutate in rng.sample(mutations, rng.choice([1, 1, 2, 3])):
        data = mutate(rng, data) if isinstance(data, list) else data
    raw = join_elements(data) if isinstance(data, list) else data
    sop_class = CTImageStorage if rng.random() < 0.05 else MRImageStorage
    sop_instance = ds.SOPInstanceUID if rng.random() < 0.9 else generate_uid()
    return ctx.sender.store(ctx.instances.write_raw(raw, sop_class, sop_instance))


CASES: dict[str, list[Case]] = {
    "pdu": [pdu_garbage, pdu_random_type, pdu_truncated_rq, pdu_mutated_rq, pdu_garbage_after_association, pdu_bad_pdv,
            pdu_odd_release, pdu_oversized, pdu_fragmented_store],
    "vanish": [vanish_before, vanish_after_rq, vanish_mid_store, vanish_after_store],
    "dataset": [dataset_hostile],
}


# -- the node under test and its checks ------------------------------------------------------


class Subject:
    """The node under test: a real ``spine-node serve`` with two receiving processes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "node" / "storage"
        self.database = workdir / "node" / "node.db"
        (workdir / "node").mkdir(parents=True)
        self.node = NodeProcess(workdir / "node", f"sqlite:///{self.database}", echo_as=CALLING, receivers=2,
                                broker_url=UNREACHABLE_BROKER, quiet_period_s=3600.0, study_timeout_s=7200.0,
                                max_pdu_size=MAX_PDU, max_instance_bytes=MAX_INSTANCE,
                                allowed_callers=[{"ae_title": CALLING}])
        self.baseline: dict[int, Counter[str]] = {}

    def start(self) -> None:
        self.node.start()

    def stop(self) -> int:
        """SIGTERM and wait: the exit code (0 when it drained and stopped cleanly)."""
        return self.node.stop()

    def kill(self) -> None:
        """SIGKILL whatever is left of the node's process group."""
        try:
            self.node.kill()
        except ProcessLookupError:
            self.node.proc = None

    def pids(self) -> list[int]:
        """The node's process and its receiving processes."""
        assert self.node.proc is not None
        return [self.node.proc.pid, *children_of(self.node.proc.pid)]

    def crashed(self) -> str | None:
        """Why the node is not whole any more (it exits when a receiver dies), or None."""
        proc = self.node.proc
        if proc is None or proc.poll() is not None:
            return f"node exited with {proc.returncode if proc else '?'}"
        if len(self.pids()) < 3:
            return f"only {len(self.pids()) - 1} of 2 receiving processes left"
        return None

    def fds(self) -> dict[int, Counter[str]]:
        """Open file descriptors of each process, by kind."""
        return {pid: _fd_kinds(pid, self.storage, self.database) for pid in self.pids()}

    def fd_excess(self) -> dict[str, int]:
        """Descriptors above the baseline, by kind (database ones beyond the pool's bound only)."""
        excess: Counter[str] = Counter()
        for pid, kinds in self.fds().items():
            base = self.baseline.get(pid, Counter())
            for kind in set(kinds) | set(base):
                allowed = DB_POOL_SIZE * FDS_PER_SQLITE_CONNECTION if kind == "database" else base[kind]
                excess[kind] += max(0, kinds[kind] - allowed)
        return dict(+excess)

    def fd_delta(self) -> int:
        """All descriptors now minus the baseline, summed over the processes."""
        now = self.fds()
        return sum(sum(kinds.values()) - sum(self.baseline.get(pid, Counter()).values()) for pid, kinds in now.items())

    def temp_files(self) -> list[str]:
        incoming = self.storage / ".incoming"
        return sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []

    def holdings(self) -> tuple[dict[str, str], set[str]]:
        """(SOP Instance UID -> path) of the index, and the stored files' paths below storage."""
        engine = create_engine(f"sqlite:///{self.database}")
        try:
            with engine.connect() as conn:
                rows = {sop: path for sop, path in conn.execute(select(Instance.sop_instance_uid, Instance.path))}
        finally:
            engine.dispose()
        files = {str(p.relative_to(self.storage)) for p in self.storage.rglob("*.dcm") if ".incoming" not in p.parts}
        return rows, files


def _fd_kinds(pid: int, storage: Path, database: Path) -> Counter[str]:
    """A process's open descriptors: socket, pipe, database, stored (a file below storage), other."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir() if Path(f"/proc/{pid}/fd").exists() else []:
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:", "anon_inode:")) else "other"
        if target.startswith(str(database)):
            kind = "database"
        elif target.startswith(str(storage)):
            kind = "stored"
        kinds[kind] += 1
    return kinds


# -- the campaign ----------------------------------------------------------------------------


@dataclass
class Report:
    """What a campaign did and found."""

    seed: int
    seconds: float = 0.0
    cases: dict[str, Counter[str]] = field(default_factory=dict)  # family -> case kind -> count
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)  # family -> outcome -> count
    wellformed: Counter[str] = field(default_factory=Counter)  # status of each well-formed instance
    failures: list[str] = field(default_factory=list)
    crashes: int = 0
    hung: int = 0
    fd_delta: int = 0
    fd_excess: dict[str, int] = field(default_factory=dict)
    temp_files: list[str] = field(default_factory=list)
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stop_exit_code: int | None = None
    log_problems: Counter[str] = field(default_factory=Counter)

    @property
    def internal_errors(self) -> int:
        """0xC211 answers: an instance took a path the node did not foresee."""
        return sum(outcomes["0xC211"] for outcomes in self.outcomes.values())

    @property
    def node_faults(self) -> list[str]:
        """Tracebacks of the node's own code, or its own threads ended by an exception."""
        return [p for p in self.log_problems if p.startswith("node.") or (p.startswith("thread ") and "pynetdicom" not in p)]

    @property
    def ok(self) -> bool:
        return not (self.failures or self.crashes or self.hung or self.fd_excess or self.temp_files or self.lost
                    or self.orphans or self.internal_errors or self.node_faults or self.stop_exit_code not in (0, None))

    def as_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": round(self.seconds, 1), "ok": self.ok,
                "cases": {f: dict(c) for f, c in self.cases.items()}, "cases_total": sum(sum(c.values()) for c in self.cases.values()),
                "outcomes": {f: dict(c) for f, c in self.outcomes.items()}, "wellformed": dict(self.wellformed),
                "acknowledged": self.acknowledged, "lost": self.lost, "orphans": self.orphans, "crashes": self.crashes,
                "hung": self.hung, "fd_delta": self.fd_delta, "fd_excess": self.fd_excess, "temp_files": self.temp_files,
                "internal_errors": self.internal_errors, "node_faults": self.node_faults, "stop_exit_code": self.stop_exit_code,
                "log_problems": dict(self.log_problems), "failures": self.failures}


def campaign(subject: Subject, seed: int, deadline: float, max_cases: int | None, progress: Callable[[str], None]) -> Report:
    """Run cases round the families until ``deadline`` or ``max_cases``, a well-formed instance after each."""
    report = Report(seed, cases={f: Counter() for f in FAMILIES}, outcomes={f: Counter() for f in FAMILIES})
    ctx = Context(subject.node.port, Instances(subject.workdir), Sender(subject.node.port))
    started = last_check = time.monotonic()
    _warm_up(subject, ctx, report)
    index = 0
    while time.monotonic() < deadline and (max_cases is None or index < max_cases):
        family = FAMILIES[index % len(FAMILIES)]
        rng = random.Random(f"{seed}:{index}")
        case = rng.choice(CASES[family])
        outcome = _guarded(lambda: case(rng, ctx))
        report.cases[family][case.__name__] += 1
        report.outcomes[family][outcome] += 1
        if outcome == "hung":
            report.hung += 1
            report.failures.append(f"case {index} ({family}/{case.__name__}) hung")
        _send_wellformed(ctx, report, index)
        index += 1
        why = subject.crashed()
        if why:
            report.crashes += 1
            report.failures.append(f"after case {index - 1} ({family}/{case.__name__}): {why}")
            break
        if time.monotonic() - last_check > CHECK_EVERY_S:
            last_check = time.monotonic()
            progress(f"{index} cases, {len(ctx.acknowledged)} acknowledged, fd delta {subject.fd_delta():+d}, "
                     f"{len(subject.temp_files())} temp files, {time.monotonic() - started:.0f} s")
    report.seconds = time.monotonic() - started
    report.acknowledged = len(ctx.acknowledged)
    if not report.crashes:
        _final_checks(subject, ctx, report)
    return report


def _guarded(run: Callable[[], str]) -> str:
    """What ``run`` returns, or how the node's side of the connection failed it."""
    try:
        return run()
    except ConnectionRefusedError:
        return "refused-connection"
    except OSError as exc:  # the node reset a connection we were still reading or writing
        return f"reset ({type(exc).__name__})"


def _warm_up(subject: Subject, ctx: Context, report: Report) -> None:
    """Store a few instances (over both receivers) so lazily opened descriptors exist, then take
    the baseline."""
    for index in range(6):
        _send_wellformed(ctx, report, -1 - index)
    subject.baseline = subject.fds()


def _send_wellformed(ctx: Context, report: Report, index: int) -> None:
    ds = ctx.instances.next()
    path = ctx.instances.write(ds)
    status = _guarded(lambda: ctx.sender.store(path))
    report.wellformed[status] += 1
    if status == "0x0000":
        ctx.acknowledged[ds.SOPInstanceUID] = hashlib.sha256(dataset_bytes(path)).hexdigest()
    else:
        report.failures.append(f"well-formed instance after case {index} got {status}")


def _final_checks(subject: Subject, ctx: Context, report: Report) -> None:
    """Once the node is quiet: descriptors, temp files, and every acknowledged instance held."""
    deadline = time.monotonic() + 60
    while (subject.fd_excess() or subject.temp_files()) and time.monotonic() < deadline:
        time.sleep(0.5)
    report.fd_excess, report.fd_delta, report.temp_files = subject.fd_excess(), subject.fd_delta(), subject.temp_files()
    rows, files = subject.holdings()
    for sop, digest in ctx.acknowledged.items():
        path = rows.get(sop)
        if path is None or path not in files:
            report.lost.append(sop)
        elif hashlib.sha256(dataset_bytes(subject.storage / path)).hexdigest() != digest:
            report.lost.append(f"{sop} (other bytes on disk)")
    report.orphans = sorted(files - set(rows.values()))


#: How node.logs reports an exception that ended a thread (spine_node.uncaught, ERROR).
UNCAUGHT_IN_THREAD = "uncaught exception in thread "


def scan_log(log: Path) -> Counter[str]:
    """Tracebacks in the node's log, by the logger that wrote them (``pynetdicom.dul``,
    ``node.scp``) or the thread they ended (``thread take-handoffs``; pynetdicom's reactor
    threads, which die on some malformed PDUs, as ``thread (pynetdicom reactor)``), and the
    exception's type."""
    problems: Counter[str] = Counter()
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    logger = "?"
    for at, line in enumerate(lines):
        if line[:4].isdigit() and len(line.split()) > 4:
            logger = line.split()[4].rstrip(":")
        if UNCAUGHT_IN_THREAD in line:  # node.logs routes a thread's uncaught exception here
            thread = line.split(UNCAUGHT_IN_THREAD, 1)[1].strip()
            logger = "thread (pynetdicom reactor)" if "(run_reactor)" in thread else f"thread {thread.split()[0]}"
        if line.startswith("Traceback (most recent call last)"):
            end = next((lines[i] for i in range(at + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), "?")
            problems[f"{logger}: {end.split(':')[0]}"] += 1
    return problems


def print_report(report: Report, out: Callable[[str], None]) -> None:
    total = sum(sum(c.values()) for c in report.cases.values())
    out(f"fuzz campaign, seed {report.seed}: {total} cases in {report.seconds:.0f} s")
    for family in FAMILIES:
        out(f"  {family:8} {sum(report.cases[family].values()):6} cases  "
            + ", ".join(f"{k} {v}" for k, v in report.cases[family].most_common()))
        out(f"  {'':8} outcomes: " + ", ".join(f"{k} {v}" for k, v in report.outcomes[family].most_common()))
    out(f"  well-formed: {sum(report.wellformed.values())} sent, " + ", ".join(f"{k} {v}" for k, v in report.wellformed.most_common()))
    out(f"  acknowledged {report.acknowledged}, lost {len(report.lost)}, orphan files {len(report.orphans)}")
    out(f"  crashes {report.crashes}, hung {report.hung}, internal errors (0xC211) {report.internal_errors}, "
        f"fd delta {report.fd_delta:+d} (excess {report.fd_excess or 0}), temp files {len(report.temp_files)}, "
        f"exit code on SIGTERM {report.stop_exit_code}")
    for problem, count in report.log_problems.most_common():
        out(f"  node log: {count} x {problem}{'  <- the node' if problem in report.node_faults else ''}")
    for failure in report.failures[:20]:
        out(f"  FAILED: {failure}")
    out("OK" if report.ok else "FAILED")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--cases", type=int, help="stop after this many cases (whichever comes first)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the case generator (default 1)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the node's folder (log, storage, database)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one campaign, print its summary, optionally write the JSON; 1 if anything failed."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="spine-node-fuzz-"))
    subject = Subject(workdir)
    subject.start()
    try:
        report = campaign(subject, args.seed, time.monotonic() + args.minutes * 60, args.cases,
                          lambda line: print(line, flush=True))
    finally:
        stop_exit_code = subject.stop() if subject.crashed() is None else None
        subject.kill()
    report.stop_exit_code = stop_exit_code
    report.log_problems = scan_log(subject.node.log)
    print_report(report, print)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if args.keep or not report.ok:
        print(f"node folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
