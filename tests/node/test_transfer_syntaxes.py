"""Compressed transfer syntaxes arrive and are stored as sent, never transcoded."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, dataset_bytes, send_raw, store

#: storescu's option to propose each syntax (it offers the uncompressed ones beside it, so the
#: node's own preference decides whether the instance travels compressed).
PROPOSE = {JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv", RLELossless: "-xr"}
DCMTK_COMPRESSORS = {JPEGLosslessSV1: ["dcmcjpeg", "+e1"], JPEGLSLossless: ["dcmcjpls"], RLELossless: ["dcmcrle"]}


def compress(source: Path, target: Path, syntax: str) -> None:
    """dcmtk's compressors where they exist; JPEG 2000 through pydicom and OpenJPEG."""
    if syntax in DCMTK_COMPRESSORS:
        subprocess.run([*DCMTK_COMPRESSORS[syntax], str(source), str(target)], check=True, capture_output=True)
    else:
        ds = dcmread(source)
        ds.compress(syntax)
        ds.save_as(target)


@pytest.mark.parametrize("sop_class", [MRImageStorage, EnhancedMRImageStorage], ids=["MR", "EnhancedMR"])
def test_compressed_instances_are_stored_as_received(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                     tmp_path: Path, sop_class: str) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=4, size=64)
    sent = tmp_path / "sent"
    sent.mkdir()
    syntaxes = [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless]
    for source, syntax in zip(study.files, syntaxes):
        ds = dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(source)
        compress(source, sent / f"{syntax}.dcm", syntax)
        assert dcmread(sent / f"{syntax}.dcm").file_meta.TransferSyntaxUID == syntax
    node = node_factory(sqlite_url)
    for syntax in syntaxes:
        result = store(node.port, [sent / f"{syntax}.dcm"], extra=[PROPOSE[syntax]])
        assert result.returncode == 0, result.stderr
    kept = {dcmread(p).SOPInstanceUID: p for p in (node.workdir / "storage").rglob("*.dcm")}
    for original in sent.iterdir():
        ds = dcmread(original)
        copy = kept[ds.SOPInstanceUID]
        assert dcmread(copy).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert dataset_bytes(copy) == dataset_bytes(original)
    assert json.loads(node.cli("studies", "--json").stdout)[0]["instances"] == 4


def test_truncated_compressed_pixel_data_is_refused(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                    tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1, size=64)
    target = tmp_path / "rle.dcm"
    compress(study.files[0], target, RLELossless)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) - 300])
    node = node_factory(sqlite_url)
    assert send_raw(node.port, target, RLELossless) == 0xC210
    assert not list((node.workdir / "storage").rglob("*.dcm"))
    assert dcmread(study.files[0]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
