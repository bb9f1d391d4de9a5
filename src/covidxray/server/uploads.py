"""Uploads: multipart files, or one file as the raw request body, streamed into memory with every size limit
enforced while reading.

Starlette's own form parsing spools files over 1 MiB to a temporary file on disk, and an X-ray
upload must never touch the disk; here every byte is counted as it arrives and the upload is
refused (413, naming the file) the moment one file passes the limit.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from .api_errors import ApiError

__all__ = ["RAW_TYPES", "Upload", "read_files"]

_PART_OVERHEAD = 16 * 1024  # multipart boundary and headers around each file, for the Content-Length check
_FIELD_LIMIT = 64 * 1024  # other form fields are ignored, but not read without bound
# Content types under which one file may be sent as the whole request body (``curl --data-binary @film.dcm``): no
# multipart framing to build or parse. The type only says "this is the file"; the format is still sniffed from the bytes.
RAW_TYPES = (b"image/png", b"image/jpeg", b"application/dicom", b"application/octet-stream")


class Upload:
    """One uploaded file, in memory."""

    __slots__ = ("name", "data")

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data


def _display_name(raw: bytes | None) -> str:
    """The client's file name, reduced to a short printable base name for messages."""
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:120]
    return name or "upload"


class _MultipartReader:
    """Callbacks for python-multipart's streaming parser that keep the files of one field in memory.

    Starlette's own form parsing spools files over 1 MiB to a temporary file on disk, and an X-ray
    upload must never touch the disk; here every byte is counted as it arrives and the upload is
    refused (413, naming the file) the moment one file passes the limit.
    """

    def __init__(self, field: str, max_files: int, max_bytes: int):
        self.field, self.max_files, self.max_bytes = field, max_files, max_bytes
        self.files: list[Upload] = []
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._chunks: list[bytes] = []
        self._size = 0
        self._keep = False
        self._name = ""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._chunks, self._size = {}, [], 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._keep = options.get(b"name", b"").decode("utf-8", "replace") == self.field
        self._name = _display_name(options.get(b"filename"))
        if self._keep and len(self.files) >= self.max_files:
            raise ApiError(413, "too_many_files", f"at most {self.max_files} files per request")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._keep:
            if self._size > self.max_bytes:
                raise ApiError(413, "file_too_large", f"{self._name}: file is larger than the upload limit "
                                                      f"of {_mib(self.max_bytes)} MiB")
            self._chunks.append(data[start:end])
        elif self._size > _FIELD_LIMIT:
            raise ApiError(413, "field_too_large", f"form field is larger than {_FIELD_LIMIT // 1024} KiB")

    def _end(self) -> None:
        if self._keep:
            self.files.append(Upload(self._name, b"".join(self._chunks)))


def _mib(n: int) -> str:
    return f"{n / 2**20:g}"


async def read_files(request: Request, field: str, max_files: int, max_bytes: int, name: str | None = None) -> list[Upload]:
    """The files in multipart field ``field``, streamed into memory with every limit enforced while reading; with
    ``max_files`` 1, also one file sent as the whole body under one of `RAW_TYPES` (named ``name``, default "upload").

    Raises:
        ApiError: 400 neither form nor no such field; 413 a file, the field count or the declared
            Content-Length is over the limit (the latter before any byte of the body is read).
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    raw = max_files == 1 and ctype in RAW_TYPES
    if not raw and (ctype != b"multipart/form-data" or not params.get(b"boundary")):
        also = f", or as the request body with Content-Type {', '.join(t.decode() for t in RAW_TYPES)}" if max_files == 1 else ""
        raise ApiError(400, "missing_file", f"send the image as multipart/form-data, in field '{field}'{also}")
    limit = max_bytes if raw else max_files * (max_bytes + _PART_OVERHEAD)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"the upload ({int(declared) / 2**20:.1f} MiB) is larger than the limit "
                                                 f"of {_mib(max_bytes)} MiB per file")
    if raw:
        shown = _display_name(name.encode() if name else None)
        too_big = ApiError(413, "file_too_large", f"{shown}: file is larger than the upload limit of {_mib(max_bytes)} MiB")
        return [Upload(shown, b"".join([chunk async for chunk in _counted(request, limit, too_big)]))]
    reader = _MultipartReader(field, max_files, max_bytes)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    too_big = ApiError(413, "request_too_large", f"the upload is larger than the limit of {_mib(max_bytes)} MiB per file")
    try:
        async for chunk in _counted(request, limit, too_big):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body: {exc}") from None
    if not reader.files:
        raise ApiError(400, "missing_file", f"no file in the upload: send the image in multipart field '{field}'")
    return reader.files


async def _counted(request: Request, limit: int, too_big: ApiError) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive, ``too_big`` raised once they pass ``limit`` bytes (a lying or absent
    Content-Length cannot get past it); a client that hangs up mid-upload is a 400."""
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_big
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection during the upload") from None
