"""Orthanc (the Debian package) as the receiving PACS of the tests: its own config, storage and
ports, an optional Lua filter, and its REST API to look at what arrived."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.services import DCMTK_ENV, ChildProcess, echo, free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"


class OrthancServer(ChildProcess):
    """One Orthanc process; ``stop``/``start`` keep its ports and storage (a PACS that is down)."""

    def __init__(self, ae_title: str = "ORTHANC", lua: str | None = None, tls: tuple[Path, Path] | None = None,
                 tls_ca: Path | None = None) -> None:
        """``lua``: a script for Orthanc's LuaScripts (filters); ``tls``: (key, certificate) for DICOM
        TLS, client certificates required and checked against ``tls_ca`` (default: the certificate itself)."""
        self.ae_title, self.port, self.http_port = ae_title, free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="spine-node-orthanc-"))
        config: dict[str, Any] = {
            "Name": "spine-node-tests", "DicomAet": ae_title, "DicomPort": self.port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"), "DicomCheckCalledAet": True, "Plugins": [],
            "DicomModalities": {}, "SaveJobs": False, "DicomAlwaysAllowFind": True,
        }
        self.echo_extra: list[str] = []
        if tls is not None:
            key, cert = tls
            trusted = tls_ca or cert
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(cert), "DicomTlsPrivateKey": str(key),
                           "DicomTlsTrustedCertificates": str(trusted), "DicomTlsRemoteCertificateRequired": True})
            self.echo_extra = ["+tls", str(key), str(cert), "+cf", str(trusted)]
        if lua is not None:
            (self.dir / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(self.dir / "filter.lua")]
        self.config = self.dir / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))

    def start(self) -> OrthancServer:
        self.spawn([ORTHANC, str(self.config)], self.dir / "orthanc.log", env=DCMTK_ENV, cwd=self.dir)
        wait_for(lambda: echo(self.port, called=self.ae_title, extra=self.echo_extra).returncode == 0, 60,
                 "Orthanc to answer C-ECHO")
        return self

    def stop(self) -> None:
        """Orthanc gone at once, as a PACS that is down."""
        self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def rest(self, path: str, body: bytes | None = None) -> Any:
        """GET (or POST ``body``) on Orthanc's REST API; the JSON answer."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", data=body, timeout=30) as reply:
            return json.load(reply)

    def instances_of(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds under the study, with its main tags and SOP Class UID."""
        found = [item["ID"] for item in self.rest("/tools/lookup", study_uid.encode()) if item["Type"] == "Study"]
        if not found:
            return []
        out = []
        for instance in self.rest(f"/studies/{found[0]}/instances"):
            tags = self.rest(f"/instances/{instance['ID']}/simplified-tags")
            out.append({"id": instance["ID"], **tags})
        return out

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file", timeout=30) as reply:
            return bytes(reply.read())
