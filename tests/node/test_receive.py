"""Receiving with real senders: dcmtk's storescu/echoscu into a running ``spine-node serve``.

Each test checks what the node acknowledged against what it holds: rows in SQL, files on disk
byte-for-byte as sent, and for bad input, a clear status and nothing left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, children_of, dataset_bytes, echo, send_raw, store, wait_for
from tests.support.wire import associate_rq, deep_sequence, finish, join_elements, p_data, pdv, read_pdu, reset, split_elements

NodeFactory = Callable[..., NodeProcess]


def studies(node: NodeProcess) -> list[dict[str, Any]]:
    return json.loads(node.cli("studies", "--json").stdout)


def shown(node: NodeProcess, uid: str) -> dict[str, Any]:
    return json.loads(node.cli("show", uid, "--json").stdout)


def stored_files(node: NodeProcess) -> list[Path]:
    storage = node.workdir / "storage"
    return sorted(p for p in storage.rglob("*") if p.is_file()) if storage.exists() else []


def test_a_study_is_stored_as_sent_and_indexed(node_factory: NodeFactory, database_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    node = node_factory(database_url)
    sent = store(node.port, tmp_path / "study")
    assert sent.returncode == 0, sent.stderr
    [row] = studies(node)
    assert row["study_instance_uid"] == study.study_instance_uid
    assert (row["instances"], row["series"]) == (9, 3)
    on_disk = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored_files(node)}
    for original in study.files:
        kept = on_disk.pop(dcmread(original, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(kept) == dataset_bytes(original)
    assert on_disk == {}


def test_series_roles_readiness_and_one_job(node_factory: NodeFactory, database_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T1_SAG", "STIR_SAG", "T2_AX", "COR"))
    node = node_factory(database_url, quiet_period_s=0.5)
    assert store(node.port, tmp_path / "study").returncode == 0
    detail = wait_for(lambda: (d := shown(node, study.study_instance_uid))["state"] == "READY" and d, 30, "READY")
    roles = {s["series_instance_uid"]: s["role"] for s in detail["series"]}
    assert roles == {study.series["T1_SAG"]: "T1_SAG", study.series["STIR_SAG"]: "STIR_SAG",
                     study.series["T2_AX"]: "T2_AX", study.series["COR"]: "OTHER"}
    assert all(s["role_reason"] for s in detail["series"])
    [job] = detail["jobs"]
    assert (job["kind"], job["state"], job["partial"]) == ("grade", "PENDING", False)
    assert [e["kind"] for e in detail["timeline"]][-1] == "ready"


def test_resending_is_idempotent(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    node = node_factory(sqlite_url, quiet_period_s=0.2)
    assert store(node.port, tmp_path / "study").returncode == 0
    wait_for(lambda: shown(node, study.study_instance_uid)["state"] == "READY", 30, "READY")
    again = store(node.port, tmp_path / "study")
    assert again.returncode == 0 and "Failed" not in again.stderr
    [row] = studies(node)
    assert row["instances"] == 9 and row["state"] == "READY"
    assert len(stored_files(node)) == 9
    assert len(shown(node, study.study_instance_uid)["jobs"]) == 1


def test_a_late_instance_reopens_the_study_and_writes_one_new_job(
    node_factory: NodeFactory, database_url: str, tmp_path: Path
) -> None:
    study = make_study(tmp_path / "study", slices=2)
    late = make_study(tmp_path / "late", roles=("T2_AX",), slices=1, study_instance_uid=study.study_instance_uid)
    node = node_factory(database_url, quiet_period_s=0.3)
    assert store(node.port, tmp_path / "study").returncode == 0
    wait_for(lambda: shown(node, study.study_instance_uid)["state"] == "READY", 30, "READY")
    assert store(node.port, late.files).returncode == 0
    detail = wait_for(lambda: (d := shown(node, study.study_instance_uid))["state"] == "READY" and len(d["jobs"]) == 2 and d,
                      30, "a second READY")
    assert [j["state"] for j in detail["jobs"]] == ["CANCELLED", "PENDING"]
    assert "reopened" in [e["kind"] for e in detail["timeline"]]
    node.stop()
    node.start()  # a restart re-checks everything and must not add a job
    wait_for(lambda: echo(node.port).returncode == 0, 30, "echo after restart")
    assert len(shown(node, study.study_instance_uid)["jobs"]) == 2


def test_timers_are_rebuilt_after_a_crash(node_factory: NodeFactory, database_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    node = node_factory(database_url, quiet_period_s=3.0)
    assert store(node.port, tmp_path / "study").returncode == 0
    node.kill()  # acknowledged, quiet period not yet over
    assert shown(node, study.study_instance_uid)["state"] == "RECEIVING"
    half_written = node.workdir / "storage" / ".incoming" / "1.2.3.dcm.999.1"
    half_written.write_bytes(b"DICM, interrupted")
    node.start()
    assert not half_written.exists()
    detail = wait_for(lambda: (d := shown(node, study.study_instance_uid))["state"] == "READY" and d, 30, "READY")
    assert len(detail["jobs"]) == 1 and detail["series"][0]["instances"] == 3
    assert [e["kind"] for e in detail["timeline"]].count("ready") == 1


@pytest.mark.parametrize(("policy", "state"), [("grade_partial", "READY"), ("mark_incomplete", "INCOMPLETE")])
def test_study_timeout_with_a_missing_role(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path,
                                           policy: str, state: str) -> None:
    study = make_study(tmp_path / "study", roles=("T1_SAG", "T2_SAG"))
    node = node_factory(sqlite_url, quiet_period_s=0.2, study_timeout_s=1.0, incomplete_policy=policy)
    assert store(node.port, tmp_path / "study").returncode == 0
    detail = wait_for(lambda: (d := shown(node, study.study_instance_uid))["state"] != "RECEIVING" and d, 30, "a decision")
    assert detail["state"] == state
    assert detail["missing_roles"] == ["T2_AX"]
    if state == "READY":
        [job] = detail["jobs"]
        assert job["partial"] is True and job["missing_roles"] == ["T2_AX"]
    else:
        assert detail["jobs"] == [] and "T2_AX" in detail["timeline"][-1]["message"]


def test_our_own_result_objects_are_never_inputs(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_SAG",), slices=1)
    ds = dcmread(study.files[0])
    ds.DeviceUID = "1.2.826.0.1.3680043.10.1234"
    ds.save_as(study.files[0])
    node = node_factory(sqlite_url, device_uid="1.2.826.0.1.3680043.10.1234")
    assert store(node.port, study.files).returncode == 0
    [series] = shown(node, study.study_instance_uid)["series"]
    assert series["role"] == "OTHER"


# -- bad input: a clear status, nothing left behind ---------------------------------------------


def assert_nothing_stored(node: NodeProcess) -> None:
    assert studies(node) == []
    assert stored_files(node) == []


def test_wrong_called_ae_title_is_rejected(node_factory: NodeFactory, sqlite_url: str) -> None:
    node = node_factory(sqlite_url)
    result = echo(node.port, called="SOMEONEELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_allowlist_checks_ae_title_and_host(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    node = node_factory(sqlite_url, echo_as="PACS",
                        allowed_callers=[{"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "ELSEWHERE", "host": "10.9.9.9"}])
    assert echo(node.port, calling="PACS").returncode == 0
    for calling in ("INTRUDER", "ELSEWHERE"):
        refused = echo(node.port, calling=calling)
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
        assert store(node.port, tmp_path / "study", calling=calling).returncode != 0
    assert_nothing_stored(node)
    assert "INTRUDER" in (node.workdir / "node.log").read_text()


def test_unknown_sop_class_has_no_presentation_context(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    unknown = "1.2.826.0.1.3680043.10.1234.99"
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = unknown
    node = node_factory(sqlite_url)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(unknown)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [unknown]
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert_nothing_stored(node)


@pytest.mark.parametrize("drop", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_is_refused(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path, drop: str) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    delattr(ds, drop)
    ds.save_as(study.files[0])
    node = node_factory(sqlite_url)
    assert send_raw(node.port, study.files[0]) == 0xA900
    assert_nothing_stored(node)
    assert f"{drop} is missing" in (node.workdir / "node.log").read_text()


def test_path_traversal_in_a_uid_is_refused(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    ds.SeriesInstanceUID = "../../../../tmp/evil"
    ds.save_as(study.files[0])
    node = node_factory(sqlite_url)
    assert send_raw(node.port, study.files[0]) == 0xA900
    assert_nothing_stored(node)


def test_truncated_dataset_is_refused(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1, size=64)
    data = study.files[0].read_bytes()
    study.files[0].write_bytes(data[: len(data) - 1000])
    node = node_factory(sqlite_url)
    assert send_raw(node.port, study.files[0]) == 0xC210
    assert_nothing_stored(node)
    assert echo(node.port).returncode == 0


def test_non_dicom_bytes_are_aborted_and_the_node_carries_on(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    node = node_factory(sqlite_url)
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x00" + b"\xff" * 4000, bytes(range(256)) * 64):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(garbage)
            # the node answers with an A-ABORT (then we, the requestor, close) or closes; never hangs
            assert finish(sock, 30) in ("abort", "closed")
    make_study(tmp_path / "study", roles=("T2_AX",), slices=2)
    assert store(node.port, tmp_path / "study").returncode == 0
    assert studies(node)[0]["instances"] == 2


def test_disk_under_the_watermark_gets_out_of_resources(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    node = node_factory(sqlite_url, min_free_disk_mb=2**40)
    assert send_raw(node.port, study.files[0]) == 0xA700
    assert_nothing_stored(node)


def test_maximum_associations(node_factory: NodeFactory, sqlite_url: str) -> None:
    node = node_factory(sqlite_url, max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert held.is_established
    try:
        refused = echo(node.port)
        assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr
    finally:
        held.release()
    wait_for(lambda: echo(node.port).returncode == 0, 10, "echo once the association is released")


def test_several_receivers_share_the_port(node_factory: NodeFactory, database_url: str, tmp_path: Path) -> None:
    uids = [make_study(tmp_path / f"study{i}", slices=4).study_instance_uid for i in range(4)]
    node = node_factory(database_url, receivers=2)
    senders = [subprocess.Popen(["/usr/bin/storescu", "-R", "+sd", "+r", "-aec", "SPINENODE", "127.0.0.1", str(node.port),
                                 str(tmp_path / f"study{i}")], stderr=subprocess.PIPE, text=True) for i in range(4)]
    assert all(p.wait(120) == 0 for p in senders)
    rows = {r["study_instance_uid"]: r["instances"] for r in studies(node)}
    assert rows == {uid: 12 for uid in uids}
    assert len(stored_files(node)) == 48
    log = (node.workdir / "node.log").read_text()
    handed = [log.count(f"handed to receiver-{i}") for i in (1, 2)]
    assert sum(handed) == 5 and min(handed) >= 2  # one C-ECHO at start, then 4 senders spread over both


def test_a_dead_receiver_takes_the_node_down(node_factory: NodeFactory, sqlite_url: str) -> None:
    node = node_factory(sqlite_url, receivers=2)
    assert node.proc is not None
    children = wait_for(lambda: len(found := children_of(node.proc.pid)) == 2 and found, 30, "two receivers")
    os.kill(children[0], signal.SIGKILL)
    assert node.proc.wait(30) != 0
    assert "exited with -9; stopping the node" in (node.workdir / "node.log").read_text()


@pytest.mark.parametrize("receivers", [1, 2])
def test_dicom_tls(node_factory: NodeFactory, sqlite_url: str, tmp_path: Path, receivers: int) -> None:
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=spine-node-test"], check=True, capture_output=True)
    tls_client = ["+tls", str(key), str(cert), "+cf", str(cert)]
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=2)
    node = node_factory(sqlite_url, echo_extra=tls_client, receivers=receivers,
                        tls={"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert), "require_client_cert": True})
    assert echo(node.port).returncode != 0  # plain TCP is not spoken
    sent = store(node.port, tmp_path / "study", extra=tls_client)
    assert sent.returncode == 0, sent.stderr
    assert studies(node)[0]["instances"] == 2
    assert len(study.files) == 2


def test_a_dataset_of_another_sop_class_than_its_context_is_refused(node_factory: NodeFactory, sqlite_url: str,
                                                                    tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: the context
    ds.save_as(study.files[0])  # the dataset itself still says MR Image Storage
    node = node_factory(sqlite_url)
    assert send_raw(node.port, study.files[0]) == 0xA900
    assert_nothing_stored(node)
    assert "does not match the context" in (node.workdir / "node.log").read_text()


# -- found by the fuzzing campaign (bench/fuzz.py) ------------------------------------------------


def test_connections_reset_before_they_are_served_leave_both_receivers_serving(node_factory: NodeFactory,
                                                                              sqlite_url: str) -> None:
    """A peer that resets its connection before the receiving process takes it over once killed
    that process's hand-off thread (getpeername failed): from then on it served nothing."""
    node = node_factory(sqlite_url, receivers=2)
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            reset(sock)
    for _ in range(6):
        assert echo(node.port, extra=["-ta", "10"]).returncode == 0
    assert "uncaught exception in thread" not in node.log.read_text()


def test_connections_pynetdicom_gives_up_on_are_counted_as_ended(node_factory: NodeFactory, sqlite_url: str) -> None:
    """A command set of noise kills pynetdicom's reactor without the events the dispatcher counted
    on; the receiver still reports the connection's end, so new ones keep going to both."""
    node = node_factory(sqlite_url, receivers=2)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            sock.sendall(associate_rq())
            assert read_pdu(sock)[0] == 0x02
            sock.sendall(p_data(pdv(1, 0x03, bytes(40))))
            while sock.recv(4096):  # the node closes the connection
                pass
    handed = node.log.read_text().count("handed to")
    for _ in range(4):
        assert echo(node.port).returncode == 0
    later = node.log.read_text().split("handed to")[handed + 1:]
    assert sorted(entry.split()[0] for entry in later) == ["receiver-1", "receiver-1", "receiver-2", "receiver-2"]


@pytest.mark.parametrize("depth", [3000, 2])
def test_a_dataset_pydicom_cannot_read_gets_cannot_understand(node_factory: NodeFactory, sqlite_url: str,
                                                              tmp_path: Path, depth: int) -> None:
    """Sequences nested too deep for pydicom (RecursionError), or with an item cut short (OSError),
    are undecodable: 0xC210 like any other, not the 0xC211 of an internal error."""
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    path = study.files[0]
    data = path.read_bytes()
    sequence = deep_sequence(random.Random(1), depth)
    if depth == 2:
        sequence = sequence[:-12]  # the innermost item ends inside an element's header
    head = len(data) - len(dataset_bytes(path))
    elements = split_elements(data[head:])
    path.write_bytes(data[:head] + join_elements([e for e in elements if e[0] < 0x00081115]) + sequence
                     + join_elements([e for e in elements if e[0] > 0x00081115]))
    node = node_factory(sqlite_url)
    assert send_raw(node.port, path) == 0xC210
    assert_nothing_stored(node)


@pytest.mark.parametrize(("tag", "vr"), [(0x00080018, b"QQ"), (0x00080016, b"FD")])
def test_a_header_element_pydicom_cannot_convert_gets_cannot_understand(node_factory: NodeFactory, sqlite_url: str,
                                                                        tmp_path: Path, tag: int, vr: bytes) -> None:
    """An unknown VR (NotImplementedError) or a UID read as doubles (BytesLengthException) in an
    element the node reads is undecodable input, not an internal error."""
    path = make_study(tmp_path / "study", roles=("T2_AX",), slices=1).files[0]
    data = path.read_bytes()
    head = len(data) - len(dataset_bytes(path))
    elements = [(t, vr if t == tag else v, value) for t, v, value in split_elements(data[head:])]
    path.write_bytes(data[:head] + join_elements(elements))
    node = node_factory(sqlite_url)
    assert send_raw(node.port, path) == 0xC210
    assert_nothing_stored(node)
