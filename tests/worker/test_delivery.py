"""Results back to PACS with a real one: storescu sends a phantom study to the node, the node
grades it and C-STOREs the SR, presentation states and key images to Orthanc (the Debian
package, started here), where the REST API finds them under the study. Also a PACS that is down
at first, one that refuses Comprehensive 3D SR, an alternate destination, the dead letter, TLS,
and a new result superseding the earlier SR."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.orthanc import OrthancServer
from tests.support.services import NodeProcess, free_port, store, wait_for
from worker.reports import read_grades

SR_3D, SR_2D, GSPS, SC = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33",
                          "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7")
REFUSE_3D_SR = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return string.find(dicom.SOPClassUID, '{SR_3D}', 1, true) == nil  -- the value may keep its NUL padding
end
"""


def _uid(study: Path) -> str:
    return str(json.loads((study / "truth.json").read_text())["study_instance_uid"])


def _send(port: int, study: Path) -> None:
    assert store(port, sorted(study.rglob("*.dcm"))).returncode == 0


def _destination(orthanc: OrthancServer, **extra: Any) -> dict[str, Any]:
    return {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.port, **extra}


def _node(node_factory: Callable[..., NodeProcess], sqlite_url: str, destinations: list[dict[str, Any]], **settings: Any) -> NodeProcess:
    return node_factory(sqlite_url, broker_url="", quiet_period_s=0.5, destinations=destinations, **settings)


def _sop_classes(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return sorted(str(i["SOPClassUID"]) for i in orthanc.instances_of(study_uid))


def test_results_arrive_in_orthanc_under_the_study(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                   phantom_study: Path, orthancs: Callable[..., OrthancServer], watch: Any) -> None:
    """SR (3D), presentation states and key images are stored in Orthanc under the source study,
    every delivery row is SENT, and the SR read back from Orthanc holds the database's grades."""
    orthanc = orthancs().start()
    node = _node(node_factory, sqlite_url, [_destination(orthanc)])
    _send(node.port, phantom_study)
    study = watch(sqlite_url, _uid(phantom_study))
    shown = study.wait_state("DELIVERED", "FAILED", timeout=180)
    assert shown["state"] == "DELIVERED", shown["timeline"]
    assert shown["deliveries"] and all(d["state"] == "SENT" and d["attempts"] == 1 for d in shown["deliveries"])
    classes = _sop_classes(orthanc, _uid(phantom_study))
    assert classes.count(SR_3D) == 1 and SR_2D not in classes and GSPS in classes and SC in classes
    assert len(classes) == len(shown["deliveries"])
    (sr,) = [i for i in orthanc.instances_of(_uid(phantom_study)) if i["SOPClassUID"] == SR_3D]
    grades = read_grades(pydicom.dcmread(BytesIO(orthanc.file(sr["id"]))))
    for level, conditions in shown["result"]["levels"].items():
        for condition, graded in conditions["conditions"].items():
            assert grades[level][condition]["grade"] == graded["grade"]
            for name, p in graded["probabilities"].items():
                assert grades[level][condition]["probabilities"][name] == pytest.approx(p, abs=1e-4)


@pytest.mark.faults
def test_a_pacs_down_at_first_gets_the_results_when_it_returns(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                               phantom_study: Path, orthancs: Callable[..., OrthancServer],
                                                               watch: Any, figure: Callable[..., None]) -> None:
    """Orthanc is not running for the first two attempts and more: the delivery waits with its
    attempts counted and the next one scheduled; once Orthanc starts, the next attempt stores everything."""
    orthanc = orthancs()
    node = _node(node_factory, sqlite_url, [_destination(orthanc)], delivery_retry_s=1.0)
    _send(node.port, phantom_study)
    study = watch(sqlite_url, _uid(phantom_study))
    shown = study.wait_state("GRADED", "DELIVERED", "FAILED", timeout=180)
    wait_for(lambda: (d := study.show()["deliveries"]) and all(x["attempts"] >= 2 for x in d), 60, "two failed delivery attempts")
    assert study.show()["state"] == "GRADED"
    deliveries = study.show()["deliveries"]
    assert all(d["state"] == "PENDING" and "failed" in d["last_status"] for d in deliveries)
    orthanc.start()
    shown = study.wait_state("DELIVERED", "FAILED", timeout=120)
    classes = _sop_classes(orthanc, _uid(phantom_study))
    assert shown["state"] == "DELIVERED" and SR_3D in classes and len(classes) == len(shown["deliveries"])
    figure("PACS down for the first retries", failed_attempts_per_object=min(d["attempts"] for d in deliveries),
           objects_made=len(shown["deliveries"]), objects_in_pacs=len(classes), final_state=shown["state"])


def test_a_pacs_refusing_3d_sr_gets_the_comprehensive_sr(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                          phantom_study: Path, orthancs: Callable[..., OrthancServer],
                                                          watch: Any) -> None:
    """Orthanc refuses Comprehensive 3D SR (a Lua filter): the Comprehensive SR twin is sent
    instead, and the delivery row and the timeline say so."""
    orthanc = orthancs(lua=REFUSE_3D_SR).start()
    node = _node(node_factory, sqlite_url, [_destination(orthanc)])
    _send(node.port, phantom_study)
    study = watch(sqlite_url, _uid(phantom_study))
    shown = study.wait_state("DELIVERED", "FAILED", timeout=180)
    assert shown["state"] == "DELIVERED", shown["timeline"]
    classes = _sop_classes(orthanc, _uid(phantom_study))
    assert SR_2D in classes and SR_3D not in classes
    assert any("as Comprehensive SR" in (d["last_status"] or "") for d in shown["deliveries"])
    assert any(e["kind"] == "delivery-fallback" for e in shown["timeline"])


def test_the_alternate_takes_over_and_dead_letters_can_be_retried(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                                  phantom_study: Path, tmp_path: Path,
                                                                  orthancs: Callable[..., OrthancServer], watch: Any) -> None:
    """Nothing answers at the destination: after its attempts the alternate receives everything.
    A second study whose only destination stays down is dead-lettered (FAILED, rows DEAD, shown);
    once that PACS is up, ``retry-failed`` delivers it."""
    alternate = orthancs(ae_title="ALTPACS").start()
    down = orthancs(ae_title="DOWNPACS")
    node = _node(node_factory, sqlite_url,
                 [{"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "alternate": _destination(alternate)}],
                 delivery_retry_s=0.2, delivery_max_attempts=2)
    _send(node.port, phantom_study)
    study = watch(sqlite_url, _uid(phantom_study))
    shown = study.wait_state("DELIVERED", "FAILED", timeout=180)
    assert shown["state"] == "DELIVERED", shown["timeline"]
    assert {d["via"] for d in shown["deliveries"]} == {f"ALTPACS@127.0.0.1:{alternate.port}"}
    assert any(e["kind"] == "delivery-alternate" for e in shown["timeline"])
    assert SR_3D in _sop_classes(alternate, _uid(phantom_study))

    node.stop()
    other = tmp_path / "other"
    shutil.copytree(phantom_study, other)
    new_study, new_series = generate_uid(), {}
    for path in other.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SOPInstanceUID = new_study, generate_uid()
        ds.SeriesInstanceUID = new_series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path)
    second_db = f"sqlite:///{tmp_path / 'node2.db'}"
    node = _node(node_factory, second_db, [_destination(down)], delivery_retry_s=0.2, delivery_max_attempts=2, name="node2")
    _send(node.port, other)
    dead = watch(second_db, new_study).wait_state("FAILED", "DELIVERED", timeout=180)
    assert dead["state"] == "FAILED" and all(d["state"] == "DEAD" for d in dead["deliveries"])
    assert "dead-lettered" in dead["jobs"][-1]["error"]
    assert "DEAD" in node.cli("show", new_study).stdout
    down.start()
    assert "1 failed studies requeued" in node.cli("retry-failed").stdout
    assert watch(second_db, new_study).wait_state("DELIVERED", "FAILED", timeout=120)["state"] == "DELIVERED"
    assert SR_3D in _sop_classes(down, new_study)


def test_delivery_over_dicom_tls(node_factory: Callable[..., NodeProcess], sqlite_url: str, phantom_study: Path,
                                 tmp_path: Path, orthancs: Callable[..., OrthancServer], watch: Any) -> None:
    """A destination with ``tls = true``: Orthanc requires TLS with client certificates, and the
    node's certificate and CA are the test's own."""
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    orthanc = orthancs(tls=(key, cert)).start()
    node = _node(node_factory, sqlite_url, [_destination(orthanc, tls=True)],
                 tls={"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)}, echo_extra=orthanc.echo_extra)
    _send_tls = store(node.port, sorted(phantom_study.rglob("*.dcm")), extra=orthanc.echo_extra)
    assert _send_tls.returncode == 0, _send_tls.stderr
    shown = watch(sqlite_url, _uid(phantom_study)).wait_state("DELIVERED", "FAILED", timeout=180)
    assert shown["state"] == "DELIVERED", shown["timeline"]
    assert SR_3D in _sop_classes(orthanc, _uid(phantom_study))


def test_a_new_result_supersedes_the_earlier_report(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                    phantom_study: Path, tmp_path: Path,
                                                    orthancs: Callable[..., OrthancServer], watch: Any) -> None:
    """A repeated T2 sagittal arrives after delivery: the study is graded again into a new
    result, whose SR names the first SR in its Predecessor Documents Sequence."""
    orthanc = orthancs().start()
    node = _node(node_factory, sqlite_url, [_destination(orthanc)])
    _send(node.port, phantom_study)
    study = watch(sqlite_url, _uid(phantom_study))
    assert study.wait_state("DELIVERED", "FAILED", timeout=180)["state"] == "DELIVERED"
    (first,) = [i for i in orthanc.instances_of(_uid(phantom_study)) if i["SOPClassUID"] == SR_3D]
    repeat = tmp_path / "repeat"
    repeat.mkdir()
    series = generate_uid()
    t2 = next(s["folder"] for s in json.loads((phantom_study / "truth.json").read_text())["series"] if s["role"] == "T2_SAG")
    for path in (phantom_study / t2).glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesTime, ds.SeriesNumber = series, generate_uid(), "235959", 99
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(repeat / path.name)
    assert store(node.port, sorted(repeat.glob("*.dcm"))).returncode == 0
    wait_for(lambda: len([i for i in orthanc.instances_of(_uid(phantom_study)) if i["SOPClassUID"] == SR_3D]) == 2, 180,
             "the second SR")
    (second,) = [i for i in orthanc.instances_of(_uid(phantom_study)) if i["SOPClassUID"] == SR_3D and i["id"] != first["id"]]
    ds = pydicom.dcmread(BytesIO(orthanc.file(second["id"])))
    predecessors = [ref.ReferencedSOPInstanceUID for item in ds.PredecessorDocumentsSequence
                    for series_item in item.ReferencedSeriesSequence for ref in series_item.ReferencedSOPSequence]
    assert predecessors == [first["SOPInstanceUID"]]
