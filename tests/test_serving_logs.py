"""The server's log format in-process: any record made inside a request carries its id;
JSON lines with time (UTC), level, logger, pid, message and the record's extra fields;
text lines for a terminal. (tests/test_serving_workers.py reads a real server's stderr.)"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from melanoma.serving.logs import (
    JsonLines,
    RequestIdFilter,
    TextLines,
    current_request_id,
    logging_config,
)


def test_one_handler_for_the_app_uvicorn_and_gradio() -> None:
    for log_format, formatter in (("json", JsonLines), ("text", TextLines)):
        config = logging_config(log_format)
        assert config["formatters"]["lines"]["()"] == f"melanoma.serving.logs.{formatter.__name__}"
        assert config["root"]["handlers"] == ["stderr"]  # the one handler, on stderr
        for name in ("melanoma", "uvicorn", "uvicorn.error", "uvicorn.access", "gradio"):
            assert config["loggers"][name] == {"level": "INFO", "handlers": [], "propagate": True}


@pytest.fixture
def configured(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go through the server's handler (formatter and request-id
    filter, in the test's format) into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter({"json": JsonLines, "text": TextLines}[request.param]())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("melanoma.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def log_inside_and_outside_a_request(logger: logging.Logger) -> None:
    token = current_request_id.set("proxy-7")
    try:
        logger.warning("inside %s", "the request", extra={"route": "/v1/predict"})
    finally:
        current_request_id.reset(token)
    try:
        raise ValueError("broken")
    except ValueError:
        logger.exception("outside")


@pytest.mark.parametrize("configured", ["json"], indirect=True)
def test_json_lines_carry_the_request_id_inside_a_request(configured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = configured
    log_inside_and_outside_a_request(logger)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(inside)[:5] == ["time", "level", "logger", "pid", "message"]
    assert datetime.fromisoformat(inside["time"]).utcoffset() == timedelta(0)
    assert (inside["level"], inside["logger"], inside["message"]) == ("WARNING", "melanoma.test_logs", "inside the request")
    assert inside["request_id"] == "proxy-7" and inside["route"] == "/v1/predict"
    assert "request_id" not in outside and "ValueError: broken" in outside["exc_info"]


@pytest.mark.parametrize("configured", ["text"], indirect=True)
def test_text_lines_for_a_terminal(configured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = configured
    log_inside_and_outside_a_request(logger)
    inside, outside = stream.getvalue().split("\n", 1)
    assert inside.endswith(f" WARNING melanoma.test_logs[{os.getpid()}]: inside the request [request proxy-7]")
    datetime.fromisoformat(inside.split(" ", 1)[0])  # an ISO 8601 time first
    assert "request" not in outside.split("\n", 1)[0].split(": ", 1)[1] and "ValueError: broken" in outside
