"""Typed errors. Every error a user can cause derives from `CovidXrayError`.

The CLI turns these into a one-line message and exit code 2; the API turns them into 4xx.
"""

from __future__ import annotations

__all__ = ["CovidXrayError", "ImageError", "IMAGE_ERROR_CODES", "DataError", "CheckpointError", "ResultsError", "DicomNodeError"]


class CovidXrayError(Exception):
    """Base class for errors caused by the user's input (files, arguments, data)."""


class ImageError(CovidXrayError):
    """A file or byte string could not be turned into an X-ray image.

    Callers decide by `code` (a database word, an HTTP status), never by the message text.

    Args:
        source: file name (or a label such as ``"<upload>"``) of the offending input.
        reason: what is wrong, phrased for the user.
        code: what is wrong, as a machine word: one of `IMAGE_ERROR_CODES`.
    """

    def __init__(self, source: str, reason: str, code: str):
        if code not in IMAGE_ERROR_CODES:
            raise ValueError(f"unknown ImageError code {code!r}; add it to IMAGE_ERROR_CODES")
        self.source = str(source)
        self.reason = reason
        self.code = code
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # pickle by the constructor's arguments, so it can cross process boundaries (DataLoader workers)
        return type(self), (self.source, self.reason, self.code)


# Why an input is no usable image, one word each; `covidxray.imaging` raises them.
IMAGE_ERROR_CODES = frozenset({
    "unreadable",  # the path is missing, a folder, a pipe, a symlink loop, or not permitted
    "empty",  # zero bytes
    "too_large",  # the file, or the pixel count it declares, is over the limit (a decompression bomb)
    "not_an_image",  # the bytes are no image format covidxray reads
    "absurd_size",  # a side too short or too long for any radiograph
    "blank",  # constant intensity: nothing to classify
    "non_finite",  # NaN or infinity in the pixel values
    "no_pixel_data",  # a DICOM header without pixels (or without Rows/Columns)
    "unsupported_compression",  # a DICOM transfer syntax with no decoder installed or known
    "undecodable",  # the decoder failed: truncated or corrupt data
})


class DataError(CovidXrayError):
    """A dataset folder, manifest or split file is missing or malformed."""


class CheckpointError(CovidXrayError):
    """A model checkpoint is missing, unsafe, or does not match what the code expects."""


class ResultsError(CovidXrayError):
    """The results database is missing, of another schema version, or its URL names no supported store."""


class DicomNodeError(CovidXrayError):
    """The DICOM listener or the answer to a PACS cannot be set up (a bad address, AE title, spool folder)."""
