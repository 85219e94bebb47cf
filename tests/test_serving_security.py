"""A real `melanoma serve` on 127.0.0.1 probed as an attacker or a careless client would:
the playground reads no file of the server that was not uploaded to it, non-images never
stay on disk, uploads are deleted, foreign hosts and origins are refused (and never
reflected), /docs and /metrics can be switched off, slow clients are cut off, pixel
limits and the prediction deadline hold, and every error says which request it was."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from crafted_images import encode, png_declaring
from live_server import LiveServer, live_server

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

LAB = "lab.example.org"  # the public name of a reverse proxy in front of the server
CACHE_SECONDS = 8


@pytest.fixture(scope="module")
def uploads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gradio-uploads")


@pytest.fixture(scope="module")
def server(trained_run: Path, ham_images_by_class: dict[str, Path], uploads_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(trained_run, run)
    (run / "examples").mkdir()
    shutil.copy(ham_images_by_class["bcc"], run / "examples" / "bcc-example.jpg")
    with live_server(
        run, tmp_path_factory.mktemp("log") / "server.log", env={"GRADIO_TEMP_DIR": str(uploads_dir)},
        trusted_hosts=["127.0.0.1", "localhost", LAB], allowed_origins=[f"https://{LAB}"],
        serve_docs=False, serve_metrics=False, ui_cache_seconds=CACHE_SECONDS,
        header_timeout_seconds=1, body_timeout_seconds=2, predict_timeout_seconds=0.25,
    ) as server:
        yield server


def call_ui(server: LiveServer, function: str, *data: Any) -> tuple[str, str]:
    """One call of the playground's API: (the event, its data) from the result stream."""
    response = httpx.post(f"{server.url}/ui/gradio_api/call/{function}", json={"data": list(data)}, timeout=30)
    assert response.status_code == 200, response.text
    stream = httpx.get(f"{server.url}/ui/gradio_api/call/{function}/{response.json()['event_id']}", timeout=120).text
    event = next(line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("event: "))
    return event, stream


def file_data(path: str | Path) -> dict[str, Any]:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def upload_to_ui(server: LiveServer, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/ui/gradio_api/upload", files=[("files", (name, data, "image/jpeg"))], timeout=30)


def assert_json_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["request_id"] == response.headers["x-request-id"]  # the id in the body, the header and the log
    return body


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- the playground's files
@pytest.mark.parametrize("function", ["classify", "explain"])
def test_a_server_side_image_that_was_not_uploaded_is_never_read(server: LiveServer, function: str,
                                                                 ham_images_by_class: dict[str, Path],
                                                                 uploads_dir: Path, tmp_path: Path) -> None:
    inside_tmp = tmp_path / "secret.jpg"  # Gradio lets functions return files from the temp folder: not read either
    shutil.copy(ham_images_by_class["mel"], inside_tmp)
    for secret in (ham_images_by_class["mel"], inside_tmp):
        extra = ["LIME", 10] if function == "explain" else []
        event, stream = call_ui(server, function, file_data(secret), *extra)
        assert event == "error", stream
        assert "confidences" not in stream and "file=" not in stream  # no prediction, no copy to fetch
        assert not any(p.read_bytes() == secret.read_bytes() for p in files_under(uploads_dir))


def test_uploaded_images_and_the_examples_are_classified(server: LiveServer, ham_images_by_class: dict[str, Path],
                                                         uploads_dir: Path) -> None:
    response = upload_to_ui(server, "lesion.jpg", ham_images_by_class["nv"].read_bytes())
    assert response.status_code == 200, response.text
    [uploaded] = response.json()
    assert Path(uploaded).is_relative_to(uploads_dir)
    event, stream = call_ui(server, "classify", file_data(uploaded))
    assert event == "complete" and "confidences" in stream, stream
    [example] = set(re.findall(r'"path": ?"([^"]*bcc-example\.jpg)"', httpx.get(f"{server.url}/ui/config").text))
    event, stream = call_ui(server, "classify", file_data(example))
    assert event == "complete" and "confidences" in stream, stream


def test_a_non_image_upload_is_refused_and_deleted(server: LiveServer, uploads_dir: Path) -> None:
    notes = b"these are notes, not an image\n" * 20
    assert_json_error(upload_to_ui(server, "notes.jpg", notes), 415, "unsupported_media_type")
    assert not any(p.read_bytes() == notes for p in files_under(uploads_dir))


def test_uploads_are_deleted_after_ui_cache_seconds_but_not_the_examples(
        server: LiveServer, ham_images_by_class: dict[str, Path]) -> None:
    [uploaded] = upload_to_ui(server, "old.jpg", ham_images_by_class["df"].read_bytes()).json()
    deadline = time.monotonic() + 10 * CACHE_SECONDS
    while Path(uploaded).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(uploaded).exists(), f"still there after {10 * CACHE_SECONDS} s"
    [example] = set(re.findall(r'"path": ?"([^"]*bcc-example\.jpg)"', httpx.get(f"{server.url}/ui/config").text))
    assert Path(example).is_file()


# --------------------------------------------------------------------------- hosts and origins
def test_a_foreign_origin_is_refused_and_never_reflected(server: LiveServer, ham_images_by_class: dict[str, Path]
                                                         ) -> None:
    jpeg = ham_images_by_class["nv"].read_bytes()
    evil = {"Host": LAB, "Origin": "https://evil.example"}  # behind the proxy: the Host is not loopback
    preflight = httpx.options(f"{server.url}/ui/gradio_api/call/classify",
                              headers={**evil, "Access-Control-Request-Method": "POST"})
    posts = [
        httpx.post(f"{server.url}/ui/gradio_api/call/classify", headers=evil, json={"data": [None]}),
        httpx.post(f"{server.url}/v1/predict", headers=evil, files=[("files", ("a.jpg", jpeg, "image/jpeg"))]),
        httpx.post(f"{server.url}/v1/predict", headers={**evil, "Origin": "null"},
                   files=[("files", ("a.jpg", jpeg, "image/jpeg"))]),
    ]
    for response in [preflight, *posts]:
        assert_json_error(response, 403, "forbidden_origin")
        assert not any(h.startswith("access-control-") for h in response.headers), dict(response.headers)


def test_the_allowed_origin_and_the_servers_own_are_served(server: LiveServer) -> None:
    lab = {"Host": LAB, "Origin": f"https://{LAB}"}
    preflight = httpx.options(f"{server.url}/v1/predict", headers={**lab, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == f"https://{LAB}"
    assert "access-control-allow-credentials" not in preflight.headers
    own = httpx.get(f"{server.url}/readyz", headers={"Origin": server.url})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


def test_an_untrusted_host_is_refused(server: LiveServer) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own name.
    for host in ("evil.example", f"evil.example:{server.port}", f"{LAB}.evil.example"):
        body = assert_json_error(httpx.get(f"{server.url}/readyz", headers={"Host": host}), 400, "untrusted_host")
        assert "trusted_hosts" in body["detail"]
    assert httpx.get(f"{server.url}/readyz", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_docs_and_metrics_can_be_switched_off(server: LiveServer) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 404, path


# --------------------------------------------------------------------------- slow clients and big images
def test_a_client_stalling_in_its_headers_or_idle_is_cut_off(server: LiveServer) -> None:
    for sent in (b"", b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(sent)
            assert sock.recv(1024) == b"", f"the server answered {sent!r} instead of closing"  # closed, not held


def test_a_client_stalling_in_its_body_gets_a_408(server: LiveServer) -> None:
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + b"--x\r\n")
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 408 " in status_line, response[:500]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "request_timeout" and "body_timeout_seconds" in body["detail"] and body["request_id"]


def test_pixel_limits_per_image_and_per_request(server: LiveServer) -> None:
    one_too_big = [("files", ("huge.png", png_declaring(6000, 5000), "image/png"))]
    body = assert_json_error(httpx.post(f"{server.url}/v1/predict", files=one_too_big), 413, "too_many_pixels")
    assert body["file"] == "huge.png" and "serve_max_pixels" in body["detail"]
    five_large = [("files", (f"{i}.png", png_declaring(6000, 4000), "image/png")) for i in range(5)]
    body = assert_json_error(httpx.post(f"{server.url}/v1/predict", files=five_large), 413, "too_many_pixels")
    assert "max_request_pixels" in body["detail"]


def test_a_prediction_over_its_deadline_is_a_504(server: LiveServer) -> None:
    # 24 megapixels at 16 bits: seconds to decode, far over predict_timeout_seconds=0.25.
    slow = encode(np.full((4000, 6000, 3), 30_000, np.uint16))
    response = httpx.post(f"{server.url}/v1/predict", files=[("files", ("slow.png", slow, "image/png"))], timeout=60)
    body = assert_json_error(response, 504, "gateway_timeout")
    assert "predict_timeout_seconds" in body["detail"]
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_every_request_is_logged_with_its_id_and_no_image(server: LiveServer,
                                                          ham_images_by_class: dict[str, Path]) -> None:
    jpeg = ham_images_by_class["nv"].read_bytes()
    served = httpx.post(f"{server.url}/v1/predict", files=[("files", ("nv.jpg", jpeg, "image/jpeg"))],
                        headers={"X-Request-ID": "proxy-7"}, timeout=60)
    assert served.status_code == 200 and served.headers["x-request-id"] == "proxy-7"
    refused = httpx.post(f"{server.url}/v1/predict", files=[("files", ("n.jpg", b"not an image" * 9, "image/jpeg"))],
                         headers={"X-Request-ID": "not a plain token"})
    request_id = assert_json_error(refused, 415, "unsupported_media_type")["request_id"]
    assert " " not in request_id  # an id that is no plain token is replaced, never logged
    lines = wait_for_log_lines(server, {"proxy-7", request_id})
    assert lines["proxy-7"]["status"] == 200 and lines["proxy-7"]["images_sha256"] == [hashlib.sha256(jpeg).hexdigest()]
    assert lines[request_id]["status"] == 415 and lines[request_id]["route"] == "/v1/predict"
    assert base64.b64encode(jpeg[:30]).decode() not in server.log.read_text()


def wait_for_log_lines(server: LiveServer, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = {r["request_id"]: r for r in server.request_log() if r.get("request_id") in request_ids}
        if lines.keys() == request_ids:
            return lines
        time.sleep(0.2)
    pytest.fail(f"no log line for {request_ids - lines.keys()}")
