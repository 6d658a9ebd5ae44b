"""Every error the server answers: an OpenAI-style JSON body with a 4xx/5xx status.

An error that follows authentication counts in the tenant's usage (`usage.invalid`), except a
rate limit, which has its own count.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from faasmoe.serving import schemas as S
from faasmoe.serving.tenants import Tenants

log = logging.getLogger("faasmoe.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}
        self.counted = counted  # already recorded in the tenant's usage


def error_response(status: int, message: str, type: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route raises as an error body."""

    def count_invalid(request: Request, status: int) -> None:
        """A request refused after authentication counts in its tenant's usage."""
        tenant = getattr(request.state, "tenant", None)
        if tenant is not None and 400 <= status < 500 and status != 429:
            Tenants.invalid(tenant)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if not e.counted:
            count_invalid(request, e.status)
        return error_response(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(S.UnsupportedParameter)
    async def _unsupported(request: Request, e: S.UnsupportedParameter):
        count_invalid(request, 400)
        return error_response(400, str(e), "invalid_request_error", "unsupported_parameter", e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        count_invalid(request, 400)
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None  # the request field at fault (a union's branch names are noise)
        msg = str(first["msg"]).removeprefix("Value error, ")
        message = msg if len(e.errors()) == 1 else f"{msg} (or {len(e.errors()) - 1} other problems)"
        return error_response(400, f"{param}: {message}" if param else message, "invalid_request_error",
                              "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        count_invalid(request, e.status_code)
        return error_response(e.status_code, str(e.detail), "invalid_request_error", "not_found"
                              if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal server error", "server_error")
