"""JPEG Lossless, Non-Hierarchical, First-Order Prediction (process 14, selection value 1) encoding.

pydicom has no encoder for this transfer syntax (1.2.840.10008.1.2.4.70); GDCM (``python-gdcm``)
has one. Decoding is left to pydicom's decoders (pylibjpeg-libjpeg, GDCM).
"""

from __future__ import annotations

import gdcm  # type: ignore[import-untyped]
import numpy as np


def encode_frame(frame: np.ndarray, bits_stored: int) -> bytes:
    """JPEG Lossless SV1 codestream of one unsigned 16-bit monochrome frame (rows, cols)."""
    if frame.ndim != 2 or frame.dtype != np.uint16:
        raise ValueError(f"frame must be a 2D uint16 array, not {frame.dtype} {frame.shape}")
    rows, cols = frame.shape
    writer = gdcm.ImageWriter()  # owns the image: GDCM objects must not be built on the stack
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, 0))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(frame.astype("<u2", copy=False).tobytes())
    image.SetDataElement(element)
    converter = gdcm.ImageChangeTransferSyntax()
    converter.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    converter.SetInput(image)
    if not converter.Change():
        raise RuntimeError("GDCM could not encode the frame as JPEG Lossless SV1")
    fragments = converter.GetOutput().GetDataElement().GetSequenceOfFragments()
    return b"".join(
        fragments.GetFragment(i).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for i in range(fragments.GetNumberOfFragments())
    )
