"""Who made a result object: equipment attributes, UIDs under our root, series numbers and the
research-use wording, shared by the SR, the presentation states and the key images."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid

from node.config import Settings

#: Said on every object we emit (series description, content description, burned into pixels).
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
#: One new series per object type, numbered apart from the scanner's series.
SERIES_NUMBERS = {"SR": 901, "PR": 902, "SC": 903}
SERIES_DESCRIPTIONS = {
    "SR": f"spine-node stenosis grades - {NOT_FOR_DIAGNOSIS}",
    "PR": f"spine-node overlay - {NOT_FOR_DIAGNOSIS}",
    "SC": f"spine-node key images - {NOT_FOR_DIAGNOSIS}",
}


@dataclass(frozen=True)
class Identity:
    """The node as the author of result objects."""

    device_uid: str
    uid_root: str
    software_version: str  # package version and the weights' hashes
    manufacturer: str = "spine-node"
    model_name: str = "spine-node lumbar stenosis grader"
    algorithm_name: str = "spine-node multi-view stenosis transformer"

    @classmethod
    def from_result(cls, settings: Settings, result: dict[str, Any]) -> Identity:
        """From the settings and a result's model block (version, weights hashes)."""
        model = result["model"]
        version = f"{model['version']} grader {str(model.get('weights_sha256') or '')[:12]} detector {str(model.get('detector_sha256') or '')[:12]}"
        return cls(settings.device_uid, settings.uid_root, version.strip())

    @property
    def package_version(self) -> str:
        return importlib.metadata.version("spine-node")

    @property
    def device_serial_number(self) -> str:
        """The installation's device UID stands in for a serial number (DICOM LO: 64 characters)."""
        return self.device_uid[-64:]

    def new_uid(self) -> str:
        """A new UID under ``uid_root`` (2.25 gives a UUID-derived UID)."""
        return str(generate_uid(prefix=None if self.uid_root == "2.25" else f"{self.uid_root}."))

    def equipment(self) -> dict[str, Any]:
        """Equipment keyword arguments shared by highdicom's SR, GSPS and SC constructors."""
        return {"manufacturer": self.manufacturer, "manufacturer_model_name": self.model_name,
                "software_versions": self.software_version[:64], "device_serial_number": self.device_serial_number}
