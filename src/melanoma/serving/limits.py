"""Limits on what clients send: the request body's size while it streams in, then each
uploaded image's type (from its bytes) and pixel count (from its header), before any
pixel is decoded."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# File signatures ("magic numbers") of the formats that both Pillow (header) and OpenCV
# (pixels) read. The client's file name and Content-Type are not trusted.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
ACCEPTED_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp")


class UploadRejected(Exception):
    """An upload that the server refuses; the API turns it into a JSON error response."""

    def __init__(self, status_code: int, error: str, detail: str, file: str | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.file = file


@dataclass(frozen=True)
class Upload:
    """An uploaded file: the name the client gave it, its bytes, and their SHA-256 (which
    the logs show instead of the image)."""

    name: str
    data: bytes
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes) -> Upload:
        return cls(name, data, hashlib.sha256(data).hexdigest())


def sniff_media_type(data: bytes) -> str | None:
    """The image type that the first bytes announce, or None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media_type for signature, media_type in _SIGNATURES if data.startswith(signature)), None)


def check_upload(upload: Upload, *, max_pixels: int) -> None:
    """Refuse non-images (415) and images with too many pixels (413), reading only the
    header. Corrupt images pass: decoding them raises :class:`ImageError` (422)."""
    name, data = upload.name, upload.data
    if not data:
        raise UploadRejected(422, "empty_file", f"{name}: empty file (0 bytes).", name)
    if sniff_media_type(data) is None:
        raise UploadRejected(
            415,
            "unsupported_media_type",
            f"{name}: not a supported image (the bytes are not {', '.join(ACCEPTED_TYPES)}).",
            name,
        )
    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
            width, height = image.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above max_pixels
        raise UploadRejected(413, "too_many_pixels", f"{name}: {exc}", name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        width = height = 0  # a corrupt header: load_image says what is wrong
    if width * height > max_pixels:
        raise UploadRejected(
            413,
            "too_many_pixels",
            f"{name}: {width}x{height} = {width * height:,} pixels, the limit (max_pixels) is {max_pixels:,}.",
            name,
        )


class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with a 413: before any
    byte is read when Content-Length declares more, else as soon as the streamed bytes
    pass the limit. The HTTPException is raised where the app reads the body, so the
    app's error handlers turn it into a JSON response."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, f"The request body is over the limit max_upload_bytes={self.max_bytes:,} bytes.")
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, receive_within_limit, send)
