"""A throw-away certificate authority for the DICOM TLS tests (openssl, RSA 2048, valid one day)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class CertificateAuthority:
    """A self-signed CA in ``folder`` that issues leaf certificates; ``self_signed`` makes one it did not issue."""

    def __init__(self, folder: Path, name: str = "spine-node-test-ca") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = folder / f"{name}.key", folder / f"{name}.crt"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out", str(self.cert),
                 "-days", "1", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
        """A key and a certificate for ``san``, signed by this CA: (key, certificate)."""
        key, csr, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
                 "-out", str(cert), "-days", "1", "-extfile", str(extensions))
        return key, cert

    def self_signed(self, name: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
        """A key and a certificate for ``san`` that no CA vouches for: an impostor's."""
        key, cert = self.folder / f"{name}.key", self.folder / f"{name}.crt"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                 "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}")
        return key, cert
