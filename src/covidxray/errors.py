"""Typed errors. Every error a user can cause derives from `CovidXrayError`.

The CLI turns these into a one-line message and exit code 2; the API turns them into 4xx.
"""

from __future__ import annotations

__all__ = ["CovidXrayError", "ImageError", "DataError", "CheckpointError", "ResultsError", "DicomNodeError"]


class CovidXrayError(Exception):
    """Base class for errors caused by the user's input (files, arguments, data)."""


class ImageError(CovidXrayError):
    """A file or byte string could not be turned into an X-ray image.

    Args:
        source: file name (or a label such as ``"<upload>"``) of the offending input.
        reason: what is wrong, phrased for the user.
    """

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # pickle by the constructor's arguments, so it can cross process boundaries (DataLoader workers)
        return type(self), (self.source, self.reason)


class DataError(CovidXrayError):
    """A dataset folder, manifest or split file is missing or malformed."""


class CheckpointError(CovidXrayError):
    """A model checkpoint is missing, unsafe, or does not match what the code expects."""


class ResultsError(CovidXrayError):
    """The results database is missing, of another schema version, or its URL names no supported store."""


class DicomNodeError(CovidXrayError):
    """The DICOM listener or the answer to a PACS cannot be set up (a bad address, AE title, spool folder)."""
