"""The status page as a browser meets it: a live server on localhost over a real SQLite database,
with a key image written to storage as a real Secondary Capture."""

from __future__ import annotations

import base64
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from node.admin import show_study
from node.config import ConfigError, Settings, load_settings
from node.db import make_engine, make_sessionmaker, migrate, transaction
from node.schema import Delivery, Event, Instance, Job, Result, ResultObject, Series, Study
from node.web import WebServer, start_web
from tests.support.services import free_port

PASSWORD = "s3cret pass"
GRADED = "1.2.826.0.1.3680043.8.498.101"
WAITING = "1.2.826.0.1.3680043.8.498.102"
KEY_IMAGE = "1.2.826.0.1.3680043.8.498.201"
REPORT = "1.2.826.0.1.3680043.8.498.202"
DESCRIPTION = "<script>alert(1)</script> T2 & sag"


@dataclass
class Site:
    """A running status page and what the test put behind it."""

    url: str
    sessions: sessionmaker[Session]
    server: WebServer


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Return redirects as they are, so a test sees the 303."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def sc_file(path: Path, pixels: np.ndarray) -> None:
    """A Secondary Capture, RGB 8-bit uncompressed, as the worker writes key images."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(KEY_IMAGE)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, KEY_IMAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = GRADED, generate_uid()
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "OT", "WSD", 903, 1
    ds.set_pixel_data(pixels, "RGB", 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def payload() -> dict[str, object]:
    """A grading result in DESIGN.md's shape: two levels, one condition not graded."""
    def graded(grade: str, p: float) -> dict[str, object]:
        rest = (1 - p) / 2
        return {"grade": grade, "probabilities": {g: (p if g == grade else rest) for g in ("normal_mild", "moderate", "severe")}}

    conditions = {"spinal_canal_stenosis": graded("severe", 0.87), "left_neural_foraminal_narrowing": graded("moderate", 0.61),
                  "right_neural_foraminal_narrowing": graded("normal_mild", 0.93), "left_subarticular_stenosis": graded("normal_mild", 0.8),
                  "right_subarticular_stenosis": graded("normal_mild", 0.7)}
    return {"study_instance_uid": GRADED, "levels": {
        "L4-L5": {"center": [0, 0, 0], "confidence": 0.9, "views": [], "conditions": conditions},
        "L5-S1": {"center": [0, 0, 10], "confidence": 0.8, "views": [], "conditions": {"spinal_canal_stenosis": graded("moderate", 0.55)}},
    }, "warnings": ["axial <b>T2</b> cut short"], "not_for_diagnostic_use": True}


def fill(sessions: sessionmaker[Session], storage: Path) -> None:
    """A graded study with a result, a key image, an SR, a stage and a delivery; and one still waiting."""
    with transaction(sessions) as session:
        graded, waiting = Study(study_instance_uid=GRADED, state="GRADED"), Study(study_instance_uid=WAITING, state="RECEIVING")
        session.add_all([graded, waiting])
        session.flush()
        series = Series(study_id=graded.id, series_instance_uid=generate_uid(), modality="MR", series_number=2,
                        series_description=DESCRIPTION, role="T2_SAG", role_reason="sagittal, TE 100 ms")
        session.add(series)
        session.flush()
        session.add_all(Instance(study_id=graded.id, series_id=series.id, sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                                 transfer_syntax_uid=ExplicitVRLittleEndian, path=f"{n}.dcm", size_bytes=1) for n in range(3))
        job = Job(study_id=graded.id, kind="grade", state="DONE", input_key="1:1")
        session.add(job)
        session.flush()
        result = Result(study_id=graded.id, job_id=job.id, input_key="k", model_name="spine-node", model_version="0.1.0",
                        weights_sha256="ab", payload=payload())
        session.add(result)
        session.flush()
        session.add_all([
            ResultObject(result_id=result.id, kind="SC", sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=KEY_IMAGE,
                         path=f"results/{GRADED}/{KEY_IMAGE}.dcm"),
            ResultObject(result_id=result.id, kind="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", sop_instance_uid=REPORT,
                         path=f"results/{GRADED}/{REPORT}.dcm"),
            Event(study_id=graded.id, kind="stage", message="grade", details={"job_id": job.id, "stage": "grade", "started_at": None,
                                                                               "ended_at": None, "duration_s": 1.234, "ok": True}),
            Delivery(study_id=graded.id, result_id=result.id, destination="PACS@10.0.0.9:104", via="PACS@10.0.0.9:104",
                     sop_instance_uid=REPORT, state="SENT", attempts=1, last_status="0x0000"),
        ])
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # red
    (storage / f"results/{GRADED}/{REPORT}.dcm").parent.mkdir(parents=True)
    (storage / f"results/{GRADED}/{REPORT}.dcm").write_bytes(b"not an image")
    sc_file(storage / f"results/{GRADED}/{KEY_IMAGE}.dcm", pixels)


def settings_for(tmp_path: Path, password_file: Path | None) -> Settings:
    return load_settings(database_url=f"sqlite:///{tmp_path / 'node.db'}", storage_dir=tmp_path / "storage", host="127.0.0.1",
                         web_port=free_port(), web_password_file=password_file)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    password_file = tmp_path / "web-password"
    password_file.write_text(PASSWORD + "\n")
    settings = settings_for(tmp_path, password_file)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    (tmp_path / "storage").mkdir()
    fill(sessions, tmp_path / "storage")
    server = start_web(settings, sessions)
    yield Site(f"http://127.0.0.1:{server.server_address[1]}", sessions, server)
    server.shutdown()
    engine.dispose()


def fetch(url: str, user: str = "admin", password: str | None = PASSWORD, form: dict[str, str] | None = None,
          raw_path: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, errors included, redirects not followed."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode() if form is not None else None)
    if password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def token_of(page: bytes) -> str:
    return re.findall(rb'name="token" value="([0-9a-f]{64})"', page)[0].decode()


def test_everything_needs_the_password(site: Site) -> None:
    for path in ("/", f"/studies/{GRADED}", f"/studies/{GRADED}/key-images/{KEY_IMAGE}.png", "/nope"):
        status, headers, body = fetch(site.url + path, password=None)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        assert GRADED.encode() not in body and b"NOT FOR DIAGNOSTIC USE" in body
    assert fetch(site.url + "/", password="wrong")[0] == 401
    assert fetch(site.url + "/", user="root")[0] == 401
    assert fetch(site.url + "/", password=PASSWORD + "\n")[0] == 401
    garbled = urllib.request.Request(site.url + "/", headers={"Authorization": "Basic %%%not-base64"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(garbled, timeout=10)
    assert refused.value.code == 401
    refused.value.close()


def test_study_list(site: Site) -> None:
    status, headers, body = fetch(site.url + "/")
    text = body.decode()
    assert status == 200 and headers["Cache-Control"] == "no-store" and headers["Content-Type"].startswith("text/html")
    assert "NOT FOR DIAGNOSTIC USE" in text
    assert re.search(rf'<a href="/studies/{re.escape(GRADED)}">{re.escape(GRADED)}</a></td><td>GRADED</td><td>1</td><td>3</td>', text)
    assert WAITING in text and "GRADED (1)" in text and "RECEIVING (1)" in text

    filtered = fetch(site.url + "/?state=RECEIVING")[2].decode()
    assert WAITING in filtered and f"/studies/{GRADED}" not in filtered
    assert fetch(site.url + "/?state=BOGUS")[0] == 400


def test_study_page(site: Site) -> None:
    status, headers, body = fetch(f"{site.url}/studies/{GRADED}")
    text = body.decode()
    assert status == 200 and headers["Cache-Control"] == "no-store" and "NOT FOR DIAGNOSTIC USE" in text
    assert "<th>level</th><th>SCS</th><th>L-NFN</th><th>R-NFN</th><th>L-SS</th><th>R-SS</th>" in text
    assert '<td>L4-L5</td><td><span class="grade severe">severe 0.87</span></td><td><span class="grade moderate">moderate 0.61</span>' in text
    assert '<td>L5-S1</td><td><span class="grade moderate">moderate 0.55</span></td><td>-</td>' in text
    assert "axial &lt;b&gt;T2&lt;/b&gt; cut short" in text  # a warning
    assert "T2_SAG" in text and "PACS@10.0.0.9:104" in text and "1.23" in text  # series, deliveries, stage timings
    assert text.count('name="token"') == 2 and 'value="grade"' in text and 'value="deliver"' in text
    assert fetch(f"{site.url}/studies/1.2.3.4")[0] == 404

    [src] = re.findall(r'<img src="([^"]+)"', text)
    assert src == f"/studies/{GRADED}/key-images/{KEY_IMAGE}.png"
    status, headers, png = fetch(site.url + src)
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["Cache-Control"] == "no-store"
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (48, 32) and picture.getpixel((5, 5)) == (200, 0, 0)


def test_markup_is_escaped(site: Site) -> None:
    text = fetch(f"{site.url}/studies/{GRADED}")[2].decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; T2 &amp; sag" in text
    assert "<script" not in text and "<b>T2" not in text


@pytest.mark.parametrize("path", [
    f"/studies/{GRADED}/key-images/1.2.3.4.png",  # no result object at all
    f"/studies/{GRADED}/key-images/{REPORT}.png",  # a result object, but the SR
    f"/studies/{WAITING}/key-images/{KEY_IMAGE}.png",  # another study's key image
    f"/studies/{GRADED}/key-images/../../../../etc/passwd.png",
    f"/studies/{GRADED}/key-images/..%2f..%2fnode.db.png",
    f"/studies/{GRADED}/key-images/{KEY_IMAGE}.dcm",
])
def test_only_key_images_are_served(site: Site, path: str) -> None:
    status, _, body = fetch(site.url + path)
    assert status == 404 and b"DICM" not in body


def test_requeue(site: Site) -> None:
    token = token_of(fetch(f"{site.url}/studies/{GRADED}")[2])
    before = len(show_study(site.sessions, GRADED)["jobs"])

    status, headers, _ = fetch(f"{site.url}/studies/{GRADED}/requeue", form={"token": token, "stage": "grade"})
    assert status == 303 and headers["Location"] == f"/studies/{GRADED}"
    study = show_study(site.sessions, GRADED)
    assert len(study["jobs"]) == before + 1 and study["jobs"][-1]["kind"] == "grade" and study["state"] == "READY"
    assert study["timeline"][-1]["kind"] == "requeued" and study["timeline"][-1]["actor"] == "web:admin"

    status, _, _ = fetch(f"{site.url}/studies/{GRADED}/requeue", form={"token": token, "stage": "deliver"})
    assert status == 303 and show_study(site.sessions, GRADED)["jobs"][-1]["kind"] == "deliver"
    assert fetch(f"{site.url}/studies/{GRADED}/requeue", form={"token": token, "stage": "store"})[0] == 400


def test_requeue_needs_the_token(site: Site) -> None:
    other = token_of(fetch(f"{site.url}/studies/{WAITING}")[2])
    for form in ({"stage": "grade"}, {"stage": "grade", "token": "0" * 64}, {"stage": "grade", "token": other}):
        status, _, body = fetch(f"{site.url}/studies/{GRADED}/requeue", form=form)
        assert status == 403 and b"token" in body
    assert len(show_study(site.sessions, GRADED)["jobs"]) == 1
    unauthenticated = fetch(f"{site.url}/studies/{WAITING}/requeue", password=None, form={"token": other, "stage": "grade"})
    assert unauthenticated[0] == 401 and show_study(site.sessions, WAITING)["jobs"] == []


def test_nothing_to_deliver_is_a_conflict(site: Site) -> None:
    token = token_of(fetch(f"{site.url}/studies/{WAITING}")[2])
    status, _, body = fetch(f"{site.url}/studies/{WAITING}/requeue", form={"token": token, "stage": "deliver"})
    assert status == 409 and b"has no result to deliver" in body
    assert show_study(site.sessions, WAITING)["jobs"] == []


def test_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    with pytest.raises(ConfigError, match="web_port needs web_password_file"):
        settings_for(tmp_path, None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="holds no password"):
        start_web(settings_for(tmp_path, empty), sessions)
