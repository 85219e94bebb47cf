"""Limits on what clients send and on the work they cause: how long a connection may take
to send its request headers and body, the body's size while it streams in, each uploaded
image's type (from its bytes) and pixel count (from its header) before any pixel is
decoded, and how many decodes and explanations may run at once."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

T = TypeVar("T")

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


def check_upload(upload: Upload, *, max_pixels: int) -> int:
    """Refuse non-images (415) and images with too many pixels (413), reading only the
    header; returns the pixel count it declares. Corrupt images pass (as 0 pixels):
    decoding them raises :class:`ImageError` (422)."""
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
            f"{name}: {width}x{height} = {width * height:,} pixels, the limit (serve_max_pixels) is {max_pixels:,}.",
            name,
        )
    return width * height


def check_uploads(uploads: Sequence[Upload], *, max_pixels: int, max_request_pixels: int) -> None:
    """Check every upload's header, then the pixels of all of them together, before any
    is decoded: one request cannot make the server decode more than ``max_request_pixels``."""
    total = sum(check_upload(upload, max_pixels=max_pixels) for upload in uploads)
    if total > max_request_pixels:
        raise UploadRejected(
            413,
            "too_many_pixels",
            f"The {len(uploads)} images of this request hold {total:,} pixels in all; the limit "
            f"(max_request_pixels) is {max_request_pixels:,}: send them in several requests.",
        )


# --------------------------------------------------------------------------- work limits
class Busy(Exception):
    """All slots for this kind of work are taken: the API answers 503 with Retry-After."""

    def __init__(self, kind: str, capacity: int, retry_after: int):
        super().__init__(f"The server is busy: {capacity} {kind}s are in progress (the most it runs at once); "
                         f"try again in {retry_after} s.")
        self.retry_after = retry_after


class Gate:
    """At most ``capacity`` jobs of one kind at once; one more is refused at once with
    :class:`Busy` instead of waiting in a queue that would grow without bound.

    A slot is held until the job's code returns, even when its caller gave up at a
    deadline, so that abandoned jobs still count. Jobs run in worker threads of their own
    (:meth:`run`), never in the thread pool that serves the other endpoints, or in the
    caller's thread (:meth:`slot`, for the UI's worker threads).
    """

    def __init__(self, kind: str, capacity: int, retry_after: int):
        self.kind = kind
        self.capacity = capacity
        self.retry_after = retry_after
        self._slots = threading.BoundedSemaphore(capacity)
        self._threads = anyio.CapacityLimiter(capacity)

    def _enter(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise Busy(self.kind, self.capacity, self.retry_after)

    @contextmanager
    def slot(self) -> Iterator[None]:
        self._enter()
        try:
            yield
        finally:
            self._slots.release()

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a worker thread, if a slot is free (else :class:`Busy`).
        Cancelling the caller (a deadline) abandons the thread, which keeps its slot
        until ``func`` returns."""
        self._enter()
        claimed = threading.Lock()  # whoever takes it releases the slot: the job, or a caller gone before it began

        def job() -> T | None:
            if not claimed.acquire(blocking=False):
                return None  # the caller gave up before the job started
            try:
                return func(*args)
            finally:
                self._slots.release()

        try:
            return await anyio.to_thread.run_sync(job, limiter=self._threads, abandon_on_cancel=True)  # type: ignore[return-value]
        except BaseException:
            if claimed.acquire(blocking=False):
                self._slots.release()
            raise


# --------------------------------------------------------------------------- connections
class BodyLimits:
    """ASGI middleware refusing request bodies over ``max_bytes`` (413), or that are not
    complete ``timeout`` seconds after the headers (408: a client stalling mid-body). An
    oversized body is refused before any byte is read when Content-Length declares it,
    else as soon as the streamed bytes pass the limit. The HTTPException is raised where
    the app reads the body, so the app's error handlers turn it into a JSON response."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, f"The request body is over the limit max_upload_bytes={self.max_bytes:,} bytes.")
        deadline = anyio.current_time() + self.timeout
        received = 0
        complete = False

        async def receive_within_limits() -> Message:
            nonlocal received, complete
            if complete:  # after the body, the app only listens for the client leaving
                return await receive()
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise too_large
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            raise HTTPException(408, f"The request body did not arrive within body_timeout_seconds={self.timeout:g} s.")

        await self.app(scope, receive_within_limits, send)


class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request headers are
    not complete ``header_timeout`` seconds after it opened or after the previous response.
    uvicorn's keep-alive timer stops at the first byte received, so a client sending half
    a header line (or nothing, on a half-open connection) would hold it for ever."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._stop_header_timer()

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()

