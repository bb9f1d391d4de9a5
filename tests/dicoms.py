"""DICOM files for tests, built with pydicom: one place for every test that needs a real DICOM file."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dx(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **tags) -> Dataset:
    """A minimal valid DX dataset holding ``pixels``; ``tags`` are set last (invalid values allowed, silently)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits)
    with warnings.catch_warnings():  # e.g. NaN is not a valid DS value: some tests need exactly that
        warnings.simplefilter("ignore")
        for key, value in tags.items():
            setattr(ds, key, value)
    return ds


def encapsulated(frame: bytes, syntax: str, shape: tuple[int, int] = (64, 64)) -> Dataset:
    """An 8-bit DX dataset whose single frame is ``frame`` (compressed bytes, not checked), as ``syntax``."""
    ds = dx(np.zeros(shape, np.uint8), bits=8)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, ``DICM`` and file meta), in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(path: Path, ds: Dataset) -> Path:
    """Write the dataset as a DICOM file at ``path``; returns ``path``."""
    path.write_bytes(to_bytes(ds))
    return path
