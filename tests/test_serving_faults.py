"""Faults against a real `melanoma serve` process on 127.0.0.1, over real HTTP: lying
Content-Length headers on a raw socket, several LIME requests at once, and a shutdown
with requests in flight. Whatever the server's limits, every answer is a success or a
clear JSON error, never a 500, and the log holds no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, free_port, wait_until_ready

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

LIME_SAMPLES = "200"


def start_server(run: Path, log: Path) -> LiveServer:
    """A real `melanoma serve` that a test may stop (or kill) itself."""
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "melanoma", "serve", "--run", str(run), "--port", str(port)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = LiveServer(f"http://127.0.0.1:{port}", port, process, log)
    wait_until_ready(server)
    return server


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    running = start_server(trained_run, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log.read_text()


def assert_clear(status: int, content_type: str, body: bytes) -> None:
    """A success, or an error a client can act on: JSON naming the problem, never a 500."""
    assert status < 500, body[:300]
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    if status >= 400:
        assert {"error", "detail"} <= set(json.loads(body)), body[:300]


def multipart(image: bytes, field: str = "files", name: str = "lesion.jpg") -> tuple[bytes, str]:
    boundary = "melanoma-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


Answer = tuple[int, str, bytes]  # status, content type, body


def send_request(url: str, declared_length: int, content_type: str, body_part: bytes) -> socket.socket:
    """Open a connection and send a POST /v1/predict declaring ``declared_length`` bytes of
    body, followed by ``body_part`` (whatever its length)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {declared_length}\r\nConnection: close\r\n\r\n")
    sock.sendall(head.encode() + body_part)
    return sock


def read_answer(sock: socket.socket) -> Answer | None:
    """The first response on ``sock``, or None if the server closed it without one."""
    with sock:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            received += chunk
        header_block, _, rest = received.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers.get("content-type", ""), rest[:length]


def lying_request(url: str, body: bytes, content_type: str, declared_length: int, *,
                  hang_up: bool = False) -> Answer | None:
    """Send all of ``body`` while declaring ``declared_length``; ``hang_up`` then closes the
    sending side, as a client that gives up does."""
    sock = send_request(url, declared_length, content_type, body)
    if hang_up:
        sock.shutdown(socket.SHUT_WR)
    return read_answer(sock)


def test_lying_content_length_over_real_http(server: LiveServer, ham_images_by_class: dict[str, Path]) -> None:
    image = next(iter(ham_images_by_class.values())).read_bytes()
    body, content_type = multipart(image)
    answers = {
        # Declares far more than any limit: refused from the header, the body never read.
        "declares 1 TB": lying_request(server.url, body, content_type, 10**12),
        # Declares less than it sends: the server reads a cut multipart body.
        "declares too little": lying_request(server.url, body, content_type, len(body) // 2),
        # Declares more than it sends, then stops sending.
        "declares too much, then EOF": lying_request(server.url, body, content_type, len(body) + 5000,
                                                     hang_up=True),
    }
    assert answers["declares 1 TB"] is not None and answers["declares 1 TB"][0] == 413
    assert answers["declares too little"] is not None
    for answer in answers.values():
        if answer is not None:  # a client that hung up may get no answer at all
            assert_clear(*answer)
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    ok = httpx.post(f"{server.url}/v1/predict", files=[("files", ("ok.jpg", image, "image/jpeg"))], timeout=60)
    assert ok.status_code == 200


def test_several_lime_requests_at_once(server: LiveServer, ham_images_by_class: dict[str, Path]) -> None:
    images = list(ham_images_by_class.values())[:2]
    responses: dict[int, httpx.Response] = {}

    def explain(index: int) -> None:
        path = images[index % 2]
        responses[index] = httpx.post(f"{server.url}/v1/explain", timeout=300,
                                      files=[("file", (path.name, path.read_bytes(), "image/jpeg"))],
                                      data={"method": "lime", "samples": LIME_SAMPLES})

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(responses) == 4
    for response in responses.values():
        assert_clear(response.status_code, response.headers.get("content-type", ""), response.content)
    # Requests that ran side by side did not mix their images up: the same image, with the
    # server's fixed seed, gives the same explanation.
    done = {i: r.json() for i, r in responses.items() if r.status_code == 200}
    for i, first in done.items():
        for j, second in done.items():
            if i < j and i % 2 == j % 2:
                assert first["details"] == second["details"] and first["sha256"] == second["sha256"]
            elif i % 2 != j % 2:
                assert first["sha256"] != second["sha256"]


def test_shutdown_with_requests_in_flight(trained_run: Path, ham_images_by_class: dict[str, Path],
                                          tmp_path: Path) -> None:
    """Requests half sent when the server is told to stop are still answered: the client
    decides when they finish, so none of them can outlast the grace period."""
    server = start_server(trained_run, tmp_path / "server.log")
    bodies = [multipart(path.read_bytes()) for path in list(ham_images_by_class.values())[:3]]
    try:
        socks = [send_request(server.url, len(body), content_type, body[: len(body) // 2])
                 for body, content_type in bodies]
        wait_for_in_flight(server.url, len(socks))
        server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "Shutting down" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the bodies end only once the server is stopping
        assert "Shutting down" in server.log.read_text()
        for sock, (body, _) in zip(socks, bodies):
            sock.sendall(body[len(body) // 2:])
        answers = [read_answer(sock) for sock in socks]
        code = server.process.wait(60)
    finally:
        server.process.kill()
    text = server.log.read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert [answer and answer[0] for answer in answers] == [200] * len(socks)
    for answer in answers:
        assert_clear(*answer)


def test_shutdown_with_explanations_running_past_the_grace_period(
        trained_run: Path, ham_images_by_class: dict[str, Path], tmp_path: Path) -> None:
    server = start_server(trained_run, tmp_path / "server.log")
    images = list(ham_images_by_class.values())
    # Six LIME explanations of 1,000 samples run one after the other: well over 5 s.
    outcomes: dict[int, httpx.Response | Exception] = {}

    def explain(index: int) -> None:
        path = images[index % len(images)]
        try:
            outcomes[index] = httpx.post(f"{server.url}/v1/explain", timeout=300,
                                         data={"method": "lime", "samples": "1000"},
                                         files=[("file", (path.name, path.read_bytes(), "image/jpeg"))])
        except httpx.TransportError as exc:  # a connection closed without an answer
            outcomes[index] = exc

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        wait_for_in_flight(server.url, 2)
        code = server.stop()
    finally:
        server.process.kill()
    for thread in threads:
        thread.join(300)
    text = server.log.read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    answered = [response for response in outcomes.values() if isinstance(response, httpx.Response)]
    # Beyond max_concurrent_explanations the server refuses at once (JSON 503 with Retry-After);
    # every explanation it accepted is finished before it stops.
    busy = [r for r in answered if r.status_code == 503 and r.json()["error"] == "busy" and "retry-after" in r.headers]
    assert [r.status_code for r in answered if r not in busy] == [200] * (len(answered) - len(busy)), \
        [(r.status_code, r.content[:200]) for r in answered]
    assert len(answered) - len(busy) >= 2


def wait_for_in_flight(url: str, n: int) -> None:
    deadline, busy = time.monotonic() + 120, 0.0
    while time.monotonic() < deadline and (busy := in_flight(url)) < n:
        time.sleep(0.05)
    assert busy >= n, f"only {busy:g} of {n} requests reached the server"


def in_flight(url: str) -> float:
    """Requests the server is handling now, besides this one."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("melanoma_http_requests_in_flight")]
    return sum(values) - 1
