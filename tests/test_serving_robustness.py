"""500 malformed requests (random bytes, cut and corrupted JPEGs, decompression bombs,
wrong multipart fields, lying Content-Length headers, oversized streamed bodies, bad form
values): not one 500, every error a JSON body, and the server still ready afterwards."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crafted_images import png_declaring
from fastapi.testclient import TestClient

from melanoma.config import Settings
from melanoma.modeling.predict import Predictor
from melanoma.serving.app import create_app

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

N_REQUESTS = 500
MAX_UPLOAD_BYTES = 200_000  # small, so that oversized bodies are cheap to send
LOOPBACK = "http://127.0.0.1"  # a trusted host (trusted_hosts setting)

Request = dict[str, Any]  # keyword arguments of TestClient.request, plus "method" and "url"


def payload_makers(jpegs: list[bytes]) -> list[Callable[[random.Random], Request]]:
    """Each maker draws one malformed (or, by chance, valid) request."""

    def files(data: bytes, name: str = "image.jpg", field: str = "files") -> list[tuple[str, Any]]:
        return [(field, (name, data, "image/jpeg"))]

    def random_bytes(rng: random.Random) -> Request:
        return {"files": files(rng.randbytes(rng.randrange(0, 5000)))}

    def magic_then_noise(rng: random.Random) -> Request:
        magic = rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\0\0\0\0WEBP"])
        return {"files": files(magic + rng.randbytes(rng.randrange(0, 3000)))}

    def cut_jpeg(rng: random.Random) -> Request:
        jpeg = rng.choice(jpegs)
        return {"files": files(jpeg[: rng.randrange(0, len(jpeg))])}

    def corrupted_jpeg(rng: random.Random) -> Request:
        jpeg = bytearray(rng.choice(jpegs))
        for _ in range(rng.randrange(1, 50)):
            jpeg[rng.randrange(2, len(jpeg))] = rng.randrange(256)
        return {"files": files(bytes(jpeg))}

    def bomb(rng: random.Random) -> Request:
        return {"files": files(png_declaring(rng.randrange(8_000, 65_000), rng.randrange(8_000, 65_000)), "bomb.png")}

    def wrong_field(rng: random.Random) -> Request:
        return {"files": files(rng.choice(jpegs), field=rng.choice(["file", "image", "", "files[]"]))}

    def not_multipart(rng: random.Random) -> Request:
        content_type = rng.choice(["application/json", "text/plain", "multipart/form-data",
                                   "multipart/form-data; boundary=x"])
        return {"content": rng.randbytes(rng.randrange(0, 2000)), "headers": {"content-type": content_type}}

    def lying_length(rng: random.Random) -> Request:
        declared = rng.choice([10**12, MAX_UPLOAD_BYTES + 1, 2**63])
        return {"content": rng.randbytes(100), "headers": {"content-type": "multipart/form-data; boundary=x",
                                                           "content-length": str(declared)}}

    def streamed_oversize(rng: random.Random) -> Request:
        chunks = (rng.randbytes(50_000) for _ in range(MAX_UPLOAD_BYTES // 50_000 + 2))
        return {"content": chunks, "headers": {"content-type": "multipart/form-data; boundary=x"}}

    def too_many_files(rng: random.Random) -> Request:
        count = rng.randrange(65, 200)
        return {"files": [("files", (f"{i}.jpg", b"\xff\xd8\xff", "image/jpeg")) for i in range(count)]}

    def bad_explain_form(rng: random.Random) -> Request:
        data = {
            "method": rng.choice(["gradcam", "lime", "LIME", "", "shap", "x" * 1000]),
            "samples": rng.choice(["-5", "0", "9", "abc", "1e9", str(2**70), ""]),
            "top_k": rng.choice(["0", "-1", "99", "two", ""]),
        }
        return {"url": "/v1/explain", "files": files(rng.randbytes(200), field="file"), "data": data}

    return [random_bytes, magic_then_noise, cut_jpeg, corrupted_jpeg, bomb, wrong_field, not_multipart,
            lying_length, streamed_oversize, too_many_files, bad_explain_form]


def test_no_malformed_request_gets_a_500(trained_run: Path, ham_images_by_class: dict[str, Path]) -> None:
    jpegs = [path.read_bytes() for path in ham_images_by_class.values()]
    makers = payload_makers(jpegs)
    rng = random.Random(0)
    app = create_app(Settings(max_upload_bytes=MAX_UPLOAD_BYTES), predictor=Predictor.from_run(trained_run))
    statuses: Counter[int] = Counter()
    failures = []
    with TestClient(app, base_url=LOOPBACK, raise_server_exceptions=False) as client:
        for i in range(N_REQUESTS):
            maker = makers[i % len(makers)]
            request = maker(rng)
            response = client.request("POST", request.pop("url", "/v1/predict"), **request)
            statuses[response.status_code] += 1
            is_json_error = response.headers.get("content-type") == "application/json" and (
                response.status_code < 400 or "error" in response.json())
            if response.status_code >= 500 or not is_json_error:
                failures.append(f"{maker.__name__}: {response.status_code} {response.text[:200]}")
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/predict", files=[("files", ("ok.jpg", jpegs[0], "image/jpeg"))]).status_code == 200
    assert not failures, f"{len(failures)} bad answers, e.g. {failures[:5]}"
    assert statuses.keys() >= {400, 413, 415, 422}, statuses
