"""Who may talk to the server: requests must name a trusted host (``trusted_hosts``: a
DNS-rebinding page cannot reach a server on 127.0.0.1 under its own name), and a browser
request from a web page must come from the server's own origin or one of
``allowed_origins`` (another site can neither read the answers nor send requests in a
visitor's name)."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from melanoma.serving.metrics import REQUEST_ID
from melanoma.serving.responses import error_response


def host_name(host: str) -> str:
    """The name in a Host header, without the port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostAndOriginGuard:
    """ASGI middleware refusing, as JSON, a Host outside ``trusted_hosts`` (400) and an
    ``Origin`` that is neither the request's own host nor one of ``allowed_origins`` (403).

    ``trusted_hosts`` holds names without port; ``*`` trusts any, ``*.example.org`` any
    subdomain. Requests without an Origin header (curl, scripts, same-origin GETs) pass.
    Same origin is judged by host and port, not scheme, so that a proxy ending TLS in
    front of the server still counts as the server's own origin.
    """

    def __init__(self, app: ASGIApp, trusted_hosts: Sequence[str], allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.trusted_hosts = [h.lower() for h in trusted_hosts]
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    def host_is_trusted(self, host: str) -> bool:
        name = host_name(host)
        return any(
            pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
            for pattern in self.trusted_hosts
        )

    def origin_is_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        return origin in self.allowed_origins or urlsplit(origin).netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        origin = headers.get("origin")
        request_id = scope.get("state", {}).get(REQUEST_ID)
        if not self.host_is_trusted(host):
            response = error_response(
                400, "untrusted_host",
                f"Host {host!r} is not served here (trusted_hosts setting: {', '.join(self.trusted_hosts)}).",
                request_id=request_id,
            )
        elif origin is not None and not self.origin_is_allowed(origin, host):
            response = error_response(
                403, "forbidden_origin",
                f"Requests from web pages of {origin} are not allowed (allowed_origins setting).",
                request_id=request_id,
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
