"""DICOM TLS with certificate verification both ways, against a CA made for the test.

As a server the node admits only callers whose certificate its ``ca_file`` vouches for (with
``require_client_cert``), and stores nothing from the others. As a sender it checks the PACS's
certificate against ``ca_file`` and the destination's host name, and sends nothing to an
impostor: the delivery waits with the reason, and the PACS holds nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.dicomgen import make_study
from tests.support.orthanc import OrthancServer
from tests.support.pki import CertificateAuthority
from tests.support.services import NodeProcess, store, wait_for


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki")


def _instances(node: NodeProcess) -> int:
    return sum(s["instances"] for s in json.loads(node.cli("studies", "--json").stdout))


def test_the_scp_admits_only_callers_certified_by_its_ca(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                         ca: CertificateAuthority, tmp_path: Path) -> None:
    """A caller with a certificate from the node's CA stores; one with a self-signed certificate,
    and one offering none (anonymous TLS), fail the handshake and leave nothing behind."""
    node_key, node_cert = ca.issue("node")
    client_key, client_cert = ca.issue("pacs")
    impostor_key, impostor_cert = ca.self_signed("impostor")
    trusted = ["+tls", str(client_key), str(client_cert), "+cf", str(ca.cert)]
    node = node_factory(sqlite_url, echo_extra=trusted,
                        tls={"cert_file": str(node_cert), "key_file": str(node_key), "ca_file": str(ca.cert),
                             "require_client_cert": True})
    make_study(tmp_path / "study", roles=("T2_AX",), slices=2)
    for refused in (["+tls", str(impostor_key), str(impostor_cert), "+cf", str(ca.cert)], ["+tla", "+cf", str(ca.cert)]):
        assert store(node.port, tmp_path / "study", extra=refused).returncode != 0
    assert _instances(node) == 0 and not list((Path(node.settings["storage_dir"])).rglob("*.dcm"))
    assert node.log.read_text().lower().count("tls handshake") == 2
    sent = store(node.port, tmp_path / "study", extra=trusted)
    assert sent.returncode == 0, sent.stderr
    assert _instances(node) == 2


@pytest.mark.parametrize("pacs_certificate", ["self-signed", "another host's"])
def test_results_are_not_sent_to_a_pacs_the_node_cannot_verify(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                               ca: CertificateAuthority, phantom_study: Path, watch: Any,
                                                               orthancs: Callable[..., OrthancServer],
                                                               pacs_certificate: str) -> None:
    """The destination wants TLS, but its certificate is self-signed, or is the CA's for another
    host name: the node refuses the handshake, records why on every delivery, and the PACS
    receives nothing."""
    node_key, node_cert = ca.issue("node")
    if pacs_certificate == "self-signed":
        orthanc = orthancs(tls=ca.self_signed("pacs")).start()
    else:
        orthanc = orthancs(tls=ca.issue("pacs", san="DNS:pacs.elsewhere.example"), tls_ca=ca.cert).start()
    sender = ["+tls", str(node_key), str(node_cert), "+cf", str(ca.cert)]  # the test's storescu speaks TLS to the node
    node = node_factory(sqlite_url, broker_url="", delivery_retry_s=30.0, echo_extra=sender,
                        tls={"cert_file": str(node_cert), "key_file": str(node_key), "ca_file": str(ca.cert)},
                        destinations=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.port, "tls": True}])
    assert store(node.port, sorted(phantom_study.rglob("*.dcm")), extra=sender).returncode == 0
    study = watch(sqlite_url, json.loads((phantom_study / "truth.json").read_text())["study_instance_uid"])
    study.wait_state("GRADED", "DELIVERED", "FAILED", timeout=240)
    deliveries = wait_for(lambda: (d := study.show()["deliveries"]) and all(x["attempts"] >= 1 for x in d) and d, 60,
                          "the first delivery attempt")
    reason = "self-signed certificate" if pacs_certificate == "self-signed" else "address mismatch"
    assert all(d["state"] == "PENDING" and reason in d["last_status"].lower() for d in deliveries), deliveries
    assert study.show()["state"] == "GRADED" and orthanc.rest("/instances") == []
