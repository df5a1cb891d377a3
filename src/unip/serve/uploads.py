"""Uploads of the web page: a private folder, a multipart reader that stores files as they stream in (never more
than the size limit), and the kind of each file decided by its content.

Nothing a client sends is used as a path: a file is stored under a name made here (a random id and the suffix of
the kind its bytes show); the client's file name is kept only as text to show (its last component, printable,
shortened).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional

from python_multipart.multipart import MultipartParser, parse_options_header

from unip.data.thermal import frame_count
from unip.data.thermal.formats import sniff
from unip.errors import DataError
from unip.text import byte_size, printable

log = logging.getLogger(__name__)

#: Bytes a multipart body may hold beyond its files' limit (boundaries, part headers, small fields).
FORM_OVERHEAD = 64 << 10
#: Largest non-file field, and most parts (files and fields) of one request.
MAX_FIELD_BYTES = 4096
MAX_PARTS = 64
#: Longest client file name shown.
MAX_NAME = 120

#: Suffix of each kind of image ``unip.data.thermal.formats.sniff`` recognises: what ``unip predict`` reads it by.
IMAGE_SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "webp": ".webp"}
#: First bytes of the video containers OpenCV reads, and the suffix that names each.
VIDEO_MAGIC = ((4, b"ftyp", ".mp4"), (0, b"\x1a\x45\xdf\xa3", ".mkv"), (0, b"\x00\x00\x01\xba", ".mpg"),
               (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", ".wmv"))

#: What each kind of content is, in messages.
KIND_NAMES = {"image": "an image", "video": "a video", "thermal": "a FLIR FFF/SEQ/CSQ file"}


class UploadError(Exception):
    """A request whose upload cannot be used: ``status`` (HTTP) and a one-line ``message`` for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """A file of a request: its form ``field``, the ``name`` to show, where it is stored, its size in bytes and its
    ``kind`` (``image``, ``video``, ``thermal``; ``None`` until :func:`classify` looked at it)."""

    field: str
    name: str
    path: str
    size: int = 0
    kind: Optional[str] = None


@dataclass
class Form:
    """A multipart request read: its text ``fields`` (name → values) and its ``files``."""

    fields: Dict[str, List[str]] = field(default_factory=dict)
    files: List[Upload] = field(default_factory=list)

    def value(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.fields.get(name)
        return values[-1] if values else default

    def uploads(self, name: str) -> List[Upload]:
        return [upload for upload in self.files if upload.field == name]

    def discard(self) -> None:
        """Remove the stored files."""
        for upload in self.files:
            _remove(upload.path)


class UploadFolder:
    """A private temporary folder (mode 0700) for uploads and results, removed by :meth:`remove` (and at exit)."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="unip-serve-")

    def new_folder(self) -> str:
        """A new, empty folder inside (for one job)."""
        path = os.path.join(self.path, uuid.uuid4().hex)
        os.mkdir(path, 0o700)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def shown_name(filename: str) -> str:
    """The client's file name as text to show: its last component (either separator), printable, at most
    ``MAX_NAME`` characters; ``upload`` when nothing is left."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = printable(base)
    if base in ("", ".", ".."):
        return "upload"
    return base if len(base) <= MAX_NAME else base[:MAX_NAME - 3] + "..."


async def read_form(content_type: str, content_length: Optional[str], body: AsyncIterator[bytes], folder: str,
                    limit: int) -> Form:
    """Read a ``multipart/form-data`` body, storing its files in ``folder`` as they stream in. ``limit``: bytes the
    files may hold in all. Raises :class:`UploadError` (400 for a malformed form, 413 past the limit, announced or
    not), leaving nothing stored."""
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise UploadError(400, "send the file as multipart/form-data (a form field named file)")
    allowed = limit + FORM_OVERHEAD
    if content_length is not None:
        try:
            announced = int(content_length)
        except ValueError:
            raise UploadError(400, f"Content-Length {printable(content_length)[:40]} is not a number") from None
        if announced > allowed:
            raise UploadError(413, _too_large(announced, limit))
    reader = _FormReader(folder)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        received = 0
        async for chunk in body:
            received += len(chunk)
            if received > allowed:
                raise UploadError(413, _too_large(received, limit, at_least=True))
            parser.write(chunk)
        parser.finalize()
        reader.check_complete()
    except UploadError:
        reader.close()
        reader.form.discard()
        raise
    except Exception as err:  # python-multipart's own errors: a malformed body
        reader.close()
        reader.form.discard()
        raise UploadError(400, f"malformed multipart body ({type(err).__name__}: {printable(err)[:120]})") from None
    return reader.form


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"the upload is {'over ' if at_least else ''}{byte_size(size)}, more than this server takes "
            f"({byte_size(limit)}, --max-upload-mb); send a smaller file or restart unip serve with a larger "
            "--max-upload-mb")


class _FormReader:
    """python-multipart's callbacks: part headers, then a file's bytes to disk or a field's bytes to memory."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.form = Form()
        self.parts = 0
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._reset_part()

    def _reset_part(self) -> None:
        self.part_name: Optional[str] = None
        self.filename: Optional[str] = None
        self.handle = None
        self.upload: Optional[Upload] = None
        self.value = bytearray()

    def callbacks(self) -> Dict[str, Callable]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(400, f"more than {MAX_PARTS} parts in one form; send fewer files per request")
        self._reset_part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]
        self._check_header()

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._header_field) + len(self._header_value) > 8192:
            raise UploadError(400, "a part header of the form is longer than 8 KiB")

    def header_end(self) -> None:
        if bytes(self._header_field).strip().lower() == b"content-disposition":
            _, params = parse_options_header(bytes(self._header_value))
            self.part_name = params.get(b"name", b"").decode("utf-8", "replace")
            filename = params.get(b"filename")
            self.filename = None if filename is None else filename.decode("utf-8", "replace")
        self._header_field.clear()
        self._header_value.clear()

    def headers_finished(self) -> None:
        if self.part_name is None:
            raise UploadError(400, "a part of the form has no Content-Disposition name")
        if self.filename is not None:
            path = os.path.join(self.folder, f"{uuid.uuid4().hex}.upload")
            self.handle = open(path, "xb")
            self.upload = Upload(self.part_name, shown_name(self.filename), path)
            self.form.files.append(self.upload)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.handle is not None:
            self.handle.write(data[start:end])
            self.upload.size += end - start  # type: ignore[union-attr]
            return
        self.value += data[start:end]
        if len(self.value) > MAX_FIELD_BYTES:
            raise UploadError(400, f"form field {printable(self.part_name)[:40]} is longer than {MAX_FIELD_BYTES} "
                                   "bytes (files go in a file part, with a filename)")

    def part_end(self) -> None:
        if self.handle is not None:
            self.handle.close()
        elif self.part_name is not None:
            self.form.fields.setdefault(self.part_name, []).append(self.value.decode("utf-8", "replace"))
        self._reset_part()

    def end(self) -> None:
        self.ended = True

    def check_complete(self) -> None:
        if not self.ended:
            raise UploadError(400, "the multipart body ended before its closing boundary (an upload cut short?)")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def classify(upload: Upload, accepted: Dict[str, str]) -> str:
    """Decide by its first bytes what ``upload`` is (``image``, ``video``, ``thermal``: an FFF/SEQ/CSQ raster) and
    rename it to a name of ours with the suffix of that kind; ``accepted``: the kinds this request takes → how to
    say them in a message. Returns the kind; raises :class:`UploadError` (400 for an empty file, 415 for another
    kind)."""
    if upload.size == 0:
        raise UploadError(400, f"{upload.name}: the file is empty")
    kind, suffix = _content_kind(upload.path, upload.name)
    if kind not in accepted:
        found = KIND_NAMES.get(kind, "none of them")
        raise UploadError(415, f"{upload.name}: its content is {found}; this takes {'; '.join(accepted.values())}")
    stored = os.path.splitext(upload.path)[0] + suffix
    os.replace(upload.path, stored)
    upload.path, upload.kind = stored, kind
    return kind


def _content_kind(path: str, name: str):
    """``(kind, suffix)`` of the file by its first bytes: ``("image", ".png")``, ``("thermal", ".fff")`` (one FLIR
    frame), ``("thermal", ".seq")`` (several: ``.csq`` where the client named it so, which only names the format
    in the report), ``("video", ".mp4")``, or ``(None, "")``."""
    image = sniff(path)
    if image == "fff":
        return "thermal", _sequence_suffix(path, name)
    if image in IMAGE_SUFFIX:
        return "image", IMAGE_SUFFIX[image]
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", ".avi"
    for offset, magic, suffix in VIDEO_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return "video", suffix
    return None, ""


def _sequence_suffix(path: str, name: str) -> str:
    """``.fff`` for a file of one FLIR frame, else ``.seq`` or ``.csq`` (``unip predict`` reads those like videos).
    A file whose frames cannot be counted is stored as a frame: reading it then says what is wrong."""
    try:
        frames = frame_count(path)
    except DataError:
        return ".fff"
    if frames <= 1:
        return ".fff"
    return ".csq" if os.path.splitext(name)[1].lower() == ".csq" else ".seq"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
