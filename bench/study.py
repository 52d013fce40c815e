"""The benchmark's load: one 512x512 MR study, generated once, copied with fresh UIDs per run.

The study comes from the tests' header-level generator (four series, realistic MR headers);
each run gets new Study, Series and SOP Instance UIDs so nothing is a duplicate.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.dicomgen import make_study

SIZE = 512
ROLES = ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX")
MANIFEST = "files.json"


@dataclass(frozen=True)
class Template:
    """The cached study: its files."""

    folder: Path
    files: list[Path]

    @property
    def size_bytes(self) -> int:
        """Bytes on the wire, roughly: the sum of the files' sizes."""
        return sum(path.stat().st_size for path in self.files)


def ensure_template(out_dir: Path, instances: int) -> Template:
    """The template study of ``instances`` files (a multiple of 4), generated unless cached."""
    folder = out_dir / f"study-{instances}"
    if not (folder / MANIFEST).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        study = make_study(folder, roles=ROLES, slices=instances // len(ROLES), size=SIZE,
                           patient_name="BENCH^INGEST", patient_id="BENCH-0001")
        names = [str(path.relative_to(folder)) for path in study.files]
        (folder / MANIFEST).write_text(json.dumps(names))  # written last: marks the cache complete
    return Template(folder, [folder / name for name in json.loads((folder / MANIFEST).read_text())])


def stamp_copy(template: Template, dest: Path) -> tuple[str, list[Path]]:
    """Copy the template into ``dest`` with fresh UIDs; return the new StudyInstanceUID and files."""
    dest.mkdir(parents=True)
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    paths = []
    for index, source in enumerate(template.files):
        ds = dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = dest / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths
