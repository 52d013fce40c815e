"""Enhanced MR Image Storage (multi-frame) encoding of a phantom series, as a scanner writes it.

One file per series: every slice of every stack is a frame. Geometry is per frame (Plane
Position, Plane Orientation: several tilted axial stacks can share one series); pixel measures,
timing, echo, modifiers, coils, averages and anatomy are shared functional groups. Frames are
organised by the two dimensions (StackID, InStackPositionNumber) of the Frame Content macro.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import DataElement
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian

from models.data.dicomwrite import VENDORS, SeriesInfo, StudyHeader, common_dataset, compress, series_time, uid
from models.data.tissues import Weighting

_CONTRAST = {Weighting.T1: "T1", Weighting.T2: "T2", Weighting.STIR: "STIR"}
_FRAME_CONTENT, _STACK_ID, _IN_STACK = 0x00209111, 0x00209056, 0x00209057


def _item(**values: object) -> Dataset:
    """A sequence item with the given attributes."""
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _seq(*items: Dataset) -> DicomSequence:
    """A DICOM sequence of items."""
    return DicomSequence(list(items))


def _image_type_tags(ds: Dataset, weighting: Weighting) -> None:
    """Image type and the MR image characteristics shared by the image and its frames."""
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = _CONTRAST[weighting]


def _pulse_sequence(ds: Dataset, series: SeriesInfo, vendor: str) -> None:
    """MR Pulse Sequence module: a 2D multi-slice spin-echo (TSE) or inversion-recovery TSE."""
    ds.PulseSequenceName = VENDORS[vendor]["sequence"][series.sequence.weighting]
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "YES"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1


def _shared_groups(series: SeriesInfo, study: StudyHeader) -> Dataset:
    """Shared functional groups: measures, frame type, timing, FOV, echo, modifiers, coils, anatomy."""
    stack, seq = series.stacks[0], series.sequence
    ir = seq.weighting is Weighting.STIR
    frame_type = _item(FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    _image_type_tags(frame_type, seq.weighting)
    modifier = _item(InversionRecovery="YES" if ir else "NO", FlowCompensation="NONE", T2Preparation="NO",
                     SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE", PartialFourier="NO",
                     ParallelAcquisition="NO")
    if ir:
        modifier.InversionTimes = [seq.ti]
    timing = _item(RepetitionTime=seq.tr, FlipAngle=seq.flip_angle, EchoTrainLength=seq.echo_train,
                   RFEchoTrainLength=seq.echo_train, GradientEchoTrainLength=0,
                   SpecificAbsorptionRateSequence=_seq(_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                                             SpecificAbsorptionRateValue=1.2)),
                   GradientOutputType="DB_DT", GradientOutput=50.0,
                   OperatingModeSequence=_seq(*[_item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                                                for kind in ("STATIC FIELD", "RF", "GRADIENT")]))
    phase_col = series.role == "T2_AX"
    fov = _item(InPlanePhaseEncodingDirection="COLUMN" if phase_col else "ROW",
                MRAcquisitionFrequencyEncodingSteps=stack.acq_cols if phase_col else stack.acq_rows,
                MRAcquisitionPhaseEncodingStepsInPlane=stack.acq_rows if phase_col else stack.acq_cols,
                PercentSampling=100.0, PercentPhaseFieldOfView=100.0)
    groups = _item(
        PixelMeasuresSequence=_seq(_item(PixelSpacing=[round(stack.pixel_spacing[0], 6), round(stack.pixel_spacing[1], 6)],
                                         SliceThickness=stack.thickness, SpacingBetweenSlices=stack.spacing)),
        MRImageFrameTypeSequence=_seq(frame_type),
        MRTimingAndRelatedParametersSequence=_seq(timing),
        MRFOVGeometrySequence=_seq(fov),
        MREchoSequence=_seq(_item(EffectiveEchoTime=seq.te)),
        MRModifierSequence=_seq(modifier),
        MRImagingModifierSequence=_seq(_item(MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
                                             TransmitterFrequency=round(42.577478 * seq.field_strength, 6), PixelBandwidth=200.0)),
        MRReceiveCoilSequence=_seq(_item(ReceiveCoilName="SPINE", ReceiveCoilManufacturerName=VENDORS[study.vendor]["manufacturer"],
                                         ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
                                         MultiCoilDefinitionSequence=_seq(_item(MultiCoilElementName="SP1", MultiCoilElementUsed="YES"))) ),
        MRTransmitCoilSequence=_seq(_item(TransmitCoilName="BODY", TransmitCoilManufacturerName=VENDORS[study.vendor]["manufacturer"],
                                          TransmitCoilType="BODY")),
        MRAveragesSequence=_seq(_item(NumberOfAverages=1)),
        FrameAnatomySequence=_seq(_item(FrameLaterality="U", AnatomicRegionSequence=_seq(
            _item(CodeValue="122496007", CodingSchemeDesignator="SCT", CodeMeaning="Lumbar spine")))),
        FrameVOILUTSequence=_seq(_item(WindowCenter=0.0, WindowWidth=1.0)),
        PixelValueTransformationSequence=_seq(_item(RescaleIntercept=0.0, RescaleSlope=1.0, RescaleType="US")),
    )
    return groups


def _per_frame(series: SeriesInfo, frames: list[tuple[int, int]], acquired: str) -> list[Dataset]:
    """Per-frame groups: frame content (stack, position), plane position and orientation."""
    out = []
    for k, i in frames:
        stack = series.stacks[k]
        content = _item(FrameAcquisitionDateTime=acquired, FrameReferenceDateTime=acquired, FrameAcquisitionDuration=1000.0,
                        StackID=str(k + 1), InStackPositionNumber=i + 1, DimensionIndexValues=[k + 1, i + 1])
        out.append(_item(
            FrameContentSequence=_seq(content),
            PlanePositionSequence=_seq(_item(ImagePositionPatient=[round(float(c), 4) for c in stack.positions[i]])),
            PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=[round(float(c), 6) for c in (*stack.row_dir, *stack.col_dir)])),
        ))
    return out


def _dimensions(ds: Dataset, organisation: str) -> None:
    """Multi-frame Dimension module: frames indexed by StackID then InStackPositionNumber."""
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=organisation))
    ds.DimensionIndexSequence = _seq(*[
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=pointer, FunctionalGroupPointer=_FRAME_CONTENT)
        for pointer in (_STACK_ID, _IN_STACK)
    ])


def enhanced_dataset(study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool) -> Dataset:
    """One Enhanced MR Image dataset holding every slice of the series as frames (uncompressed)."""
    frames = [(k, i) for k, stack in enumerate(series.stacks) for i in range(len(stack.positions))]
    if reverse:
        frames = frames[::-1]
    ds = common_dataset(study, series)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = uid(study.uid_root, series.role, series.number, "enhanced")
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    _image_type_tags(ds, series.sequence.weighting)
    acquired = f"{study.study_date}{series_time(study, series)}"
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 60.0 * len(frames) / max(len(series.stacks[0].positions), 1)
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = series.sequence.field_strength
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    _pulse_sequence(ds, series, study.vendor)
    ds.AcquisitionContextSequence = _seq()
    shared = _shared_groups(series, study)
    shared.FrameVOILUTSequence[0].WindowCenter, shared.FrameVOILUTSequence[0].WindowWidth = window
    ds.SharedFunctionalGroupsSequence = _seq(shared)
    ds.PerFrameFunctionalGroupsSequence = _seq(*_per_frame(series, frames, acquired))
    _dimensions(ds, uid(study.uid_root, series.role, series.number, "dimensions"))
    ds.NumberOfFrames = len(frames)
    stack = series.stacks[0]
    ds.Rows, ds.Columns = stack.rows, stack.cols
    data = np.stack([pixels[k][i] for k, i in frames])
    ds["PixelData"] = DataElement(0x7FE00010, "OW", data.tobytes())
    return ds


def write_enhanced(folder: Path, study: StudyHeader, series: SeriesInfo, pixels: list[np.ndarray], window: tuple[float, float], reverse: bool = False, compression: str | None = None) -> list[Path]:
    """Write one series as a single Enhanced MR Image file; returns its path in a list."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = enhanced_dataset(study, series, pixels, window, reverse)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    frames = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    compress(ds, frames, compression)
    path = folder / "1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]
