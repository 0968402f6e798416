"""One error shape for every 4xx and 5xx: `{"error": "<machine_code>", "detail": "<text>", ...}`.

Apps branch on `error` (stable, snake case) and show `detail` (human, may change). Validation
failures add `fields`, naming each bad input. Litestar's own exceptions (unknown route, wrong
method, body decoding) are translated here too, so no response ever leaks Litestar's default
`{"status_code": ..., "detail": ...}` shape or a stack trace.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

log = logging.getLogger(__name__)


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code; extra keyword arguments join the body."""

    def __init__(
        self,
        status_code: int,
        error: str,
        detail: str = "",
        *,
        headers: dict[str, str] | None = None,
        **body_extra: Any,
    ) -> None:
        super().__init__(detail=detail or HTTPStatus(status_code).phrase, status_code=status_code, headers=headers)
        self.error = error
        self.body_extra = body_extra


class ErrorBody(msgspec.Struct):
    """Every error response has this shape (some add more fields, documented per endpoint)."""

    error: str
    detail: str


class FieldError(msgspec.Struct):
    field: str
    source: str
    message: str


class ValidationErrorBody(msgspec.Struct):
    """A 400: `validation_failed` names each bad field in `fields`; a request that is well
    formed but refused for another reason (an expired code, a window too long) has its own
    `error` and no `fields`."""

    error: str
    detail: str
    fields: list[FieldError] = msgspec.field(default_factory=list)


def error_response(
    status_code: int,
    error: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[dict[str, Any]]:
    return Response(
        content={"error": error, "detail": detail, **extra},
        status_code=status_code,
        media_type=MediaType.JSON,
        headers=headers,
    )


def code_for_status(status_code: int) -> str:
    """A machine code for errors raised without one (Litestar's own): 404 -> "not_found"."""
    special = {401: "unauthorized", 403: "forbidden", 429: "rate_limited", 500: "internal_error"}
    if status_code in special:
        return special[status_code]
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        return "error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def field_errors(extra: Any) -> list[dict[str, str]]:
    """Litestar reports validation problems as a list of {message, key, source}; name the
    actual field even when the problem is reported against the whole body (`data`)."""
    if not isinstance(extra, list):
        return []
    fields = []
    for item in extra:
        if isinstance(item, dict):
            message = str(item.get("message", ""))
            key = str(item.get("key") or "")
            if key in ("", "data"):
                key = _field_from_message(message) or ("body" if key == "data" else key)
            fields.append({"field": key, "source": _source_name(item.get("source")), "message": message})
    return fields


def _field_from_message(message: str) -> str:
    """msgspec names the field in its message: "... at `$.amount_minor`", "missing required
    field `purpose`", "unknown field `extra`"."""
    for pattern in (r"at `\$\.?([^`]*)`", r"required field `([^`]*)`", r"unknown field `([^`]*)`"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return ""


def _source_name(source: Any) -> str:
    """Litestar passes a ParamType enum for parameters and a string for the body."""
    if source is None:
        return "body"
    return str(getattr(source, "value", source))


def handle_http_exception(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.error, exc.detail, headers=exc.headers, **exc.body_extra)
    if isinstance(exc, ValidationException) or exc.status_code == 400:
        # Litestar raises a bare 400 for a body that is not JSON at all: the same kind of
        # client mistake, so the same code.
        fields = field_errors(exc.extra) or [{"field": "body", "source": "body", "message": exc.detail}]
        return error_response(400, "validation_failed", _validation_detail(fields), headers=exc.headers, fields=fields)
    if exc.status_code >= 500:
        log.error("server error on %s %s: %s", request.method, request.url.path, exc.detail)
        return error_response(exc.status_code, code_for_status(exc.status_code), "internal server error")
    return error_response(exc.status_code, code_for_status(exc.status_code), exc.detail, headers=exc.headers)


def _validation_detail(fields: list[dict[str, str]]) -> str:
    return "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "the request is not valid"


def handle_unexpected(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    """A bug: log it with its traceback, tell the client nothing about the internals."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {HTTPException: handle_http_exception, Exception: handle_unexpected}


_DESCRIPTIONS = {
    400: "Validation failed: `error` is `validation_failed` and `fields` names each bad input",
    401: "Missing, expired or tampered token (`unauthorized`)",
    403: "The caller's role may not do this (`forbidden`)",
    404: "Not found (`*_not_found`)",
    409: "Refused in the current state; `error` names the reason",
    413: "Too large (`file_too_large`, with `max_bytes`)",
    415: "A file type this endpoint does not take (`unsupported_media_type`, `content_mismatch`)",
    422: "Well-formed but not acceptable (for example an inactive package)",
    429: "Too many requests (`rate_limited`); see the Retry-After header",
    503: "A dependency is unavailable",
}


def error_responses(*status_codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a handler's error responses, all in the one error shape."""
    specs: dict[int, ResponseSpec] = {}
    for status_code in status_codes:
        container = ValidationErrorBody if status_code == 400 else ErrorBody
        specs[status_code] = ResponseSpec(
            data_container=container,
            description=_DESCRIPTIONS.get(status_code, HTTPStatus(status_code).phrase),
            generate_examples=False,
        )
    return specs
