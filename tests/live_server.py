"""`melanoma serve` as a real server process on 127.0.0.1, for the tests that probe it as
a client would: started with settings given as MELANOMA_* variables, stopped by SIGINT
(as Ctrl+C would), its output kept in a log file (stdout and stderr together, or stderr,
where the server logs, in a file of its own)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen
    log: Path
    stderr: Path | None = None  # where stderr went, if not to log

    def stop(self, timeout: float = 120) -> int:
        """SIGINT, then the exit code once it has drained and stopped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the server did not stop within {timeout:.0f} s of SIGINT:\n{self.log.read_text()[-3000:]}")

    def json_log(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (log_format json)."""
        return [json.loads(line) for line in (self.stderr or self.log).read_text().splitlines() if line.startswith("{")]

    def request_log(self) -> list[dict[str, Any]]:
        """The lines of the request log so far."""
        return [r for r in self.json_log() if r["logger"] == "melanoma.serving.access"]


def wait_until_ready(server: LiveServer, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with code {server.process.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.process.kill()
    pytest.fail(f"the server was not ready after {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")


@contextmanager
def live_server(run: Path, log: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                stderr: Path | None = None, ready_timeout: float = 240, **settings: Any) -> Iterator[LiveServer]:
    """`melanoma serve --run RUN [ARGS]` on a free port, with ``settings`` as MELANOMA_*
    variables and ``env`` as further environment variables; its stderr goes to ``stderr``
    if given, else with its stdout to ``log``."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.update({f"MELANOMA_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
                for name, value in settings.items()})
    command = [sys.executable, "-m", "melanoma", "serve", "--run", str(run), "--port", str(port), *args]
    with open(log, "wb") as output, (open(stderr, "wb") if stderr else nullcontext(subprocess.STDOUT)) as errors:
        process = subprocess.Popen(command, stdout=output, stderr=errors, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", port, process, log, stderr)
    try:
        wait_until_ready(server, ready_timeout)
        yield server
    finally:
        server.stop()
