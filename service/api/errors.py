"""OpenAI-style error envelope {"error": {message, type, param, code}} for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}


def error_type(status: int) -> str:
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type_ or error_type(status)


def envelope(status: int, message: str, *, type_: str | None = None, param: str | None = None,
             code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or error_type(status),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_param(loc: tuple) -> str | None:
    if loc[:1] == ("header",) and len(loc) > 1:  # the header's name as the client sent it
        return str(loc[1])
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # drop pydantic's union-member tags (e.g. 'PruningOptions', 'str') from the path
    parts = [p for p in parts if not (p[:1].isupper() or p in ("str", "int", "float", "bool", "constrained-str"))]
    return ".".join(parts) or None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:  # not a JSON document (its loc holds the byte offset, not a field)
        at = bad_json.get("loc", ())[-1]
        return envelope(400, f"the request body is not valid JSON (at character {at})", code="invalid_json")
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:  # as OpenAI answers it: a misspelt field is not silently ignored
        name = _loc_param(tuple(unknown.get("loc", ())))
        return envelope(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    content_type = request.headers.get("content-type", "")
    if content_type and not _is_json(content_type) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return envelope(415, f"the request body must be JSON (Content-Type: application/json), not {content_type}",
                        code="unsupported_media_type")
    # the deepest location is the most specific (a union reports one error per member)
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_param(tuple(first.get("loc", ())))
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    kinds = {e.get("type") for e in errors if _loc_param(tuple(e.get("loc", ()))) == param}
    if "string_type" in kinds and kinds & {"model_type", "model_attributes_type", "dict_type"}:  # neither member
        msg = f"{param}: expected a name (a string) or an object of settings"
    return envelope(422, msg, param=param, code="invalid_value" if param else "invalid_body")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return envelope(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code, headers=exc.headers)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return envelope(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


BACKEND_RETRY_AFTER_S = 5


async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
    """The queue backend failed: 503 with Retry-After, not a 500. Redis out of memory (maxmemory with
    noeviction, as the shipped manifests run it) refuses writes with an OOM reply, inside a script as
    an error naming it (the first write fails, so the script wrote nothing); anything else
    (connection refused or lost, timeouts, a failover) is "unavailable". Nothing was accepted."""
    full = isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)
    log.warning("queue backend error on %s: %s", request.url.path, exc)
    message = ("the job queue is out of memory; retry later" if full
               else "the job queue (Redis) is unavailable; retry later")
    return envelope(503, message, code="queue_backend_full" if full else "queue_backend_unavailable",
                    headers={"Retry-After": str(BACKEND_RETRY_AFTER_S)})


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return envelope(500, "internal server error", code="internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(RedisError, _redis_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight answers in the error envelope (it answered
    400 text/plain "Disallowed CORS origin")."""

    PARAMS = {"origin": "Origin", "method": "Access-Control-Request-Method",
              "headers": "Access-Control-Request-Headers",
              "private-network": "Access-Control-Request-Private-Network"}

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return envelope(400, f"CORS preflight refused: {', '.join(refused)} not allowed", code="cors_not_allowed",
                        param=self.PARAMS.get(refused[0]), headers=headers)
