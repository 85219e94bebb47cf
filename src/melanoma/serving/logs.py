"""One log format for the server: every record of the app, uvicorn and Gradio goes through
one handler on stderr, as JSON lines (for log collectors) or plain text (for a terminal).

A record made while a request is served carries the request's id (the ``X-Request-ID``
that :class:`~melanoma.serving.metrics.ObserveRequests` gives it), through a context
variable, so that any line logged on the request's behalf can be traced to it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from melanoma.config import LogFormat

# The id of the request being served in this context (None outside a request).
current_request_id: ContextVar[str | None] = ContextVar("melanoma_request_id", default=None)

# Loggers at INFO; all others (httpx, which logs every HTTP call Gradio makes, TensorFlow,
# warnings) reach the same handler from WARNING on.
_INFO_LOGGERS = ("melanoma", "uvicorn", "uvicorn.error", "uvicorn.access", "gradio")


def _utc_time(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC, to the millisecond: ``2026-03-01T12:00:00.123+00:00``."""
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being served, if any, on the record as ``request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id is not None:
            record.request_id = request_id
        return True


class JsonLines(JsonFormatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``pid``, ``message``, then
    ``request_id`` inside a request and the record's extra fields (the request log's
    method, route, status ...)."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "process", "message"],
            rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
            # uvicorn repeats each start-up message with terminal colours as an extra.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = _utc_time(record)  # first, where a reader looks for it
        super().add_fields(log_data, record, message_dict)


class TextLines(logging.Formatter):
    """``time LEVEL logger[pid]: message [request id]``, for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} [request {request_id}]"


def logging_config(log_format: LogFormat) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of the server (uvicorn applies it in each process):
    one stderr handler, in ``log_format``, for every logger."""
    formatter = {"json": JsonLines, "text": TextLines}[log_format]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"lines": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "lines",
                       "filters": ["request_id"]},
        },
        # No handler of their own: they reach the root's (uvicorn's defaults would give them theirs).
        "loggers": {name: {"level": "INFO", "handlers": [], "propagate": True} for name in _INFO_LOGGERS},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }
