"""The JSON error body that every error of the server has, wherever it is made: in the
app's exception handlers or in a middleware that refuses a request before the app."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse


class ErrorBody(BaseModel):
    error: str = Field(description="A stable code, e.g. unsupported_media_type.")
    detail: str = Field(description="What was wrong, in words.")
    file: str | None = Field(None, description="The uploaded file concerned, if any.")
    request_id: str | None = Field(None, description="The request's id, as in its X-Request-ID header and log line.")


def error_response(status: int, error: str, detail: str, *, request_id: str | None, file: str | None = None,
                   headers: Any = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=error, detail=detail, file=file, request_id=request_id).model_dump(), status,
                        headers=headers)
