"""Every error response is ``application/problem+json`` (RFC 9457).

Body: ``type`` (a URI naming the kind of problem; ``about:blank`` for plain HTTP statuses),
``title``, ``status``, ``detail``, ``instance`` (the request path) and, for input errors,
``errors``: ``[{"field": "spec.damage.fraction", "message": "..."}]`` naming each field at fault
in dotted form (list positions in brackets: ``images[2]``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from core.exceptions import CamresError, InputError
from service.store import StoreError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
_PROBLEM_BASE = "urn:camres:problem:"


class FieldError(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description='Dotted path, e.g. "spec.damage.fraction" or "images[0]".')
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(default="about:blank", description="URI identifying the problem type.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


class ApiError(Exception):
    """An error a handler raises to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        problem: str | None = None,
        title: str | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problem = problem
        self.title = title or HTTPStatus(status).phrase
        self.errors = list(errors) if errors else None
        self.headers = headers
        self.extra = extra or {}


def field_error(field: str, message: str, status: int = 422, **kwargs: Any) -> ApiError:
    """A 4xx problem about one request field."""
    return ApiError(
        status,
        f"{field}: {message}",
        problem=kwargs.pop("problem", "invalid-request"),
        errors=[FieldError(field=field, message=message)],
        **kwargs,
    )


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"no {what} with id {ident!r}", problem="not-found")


def loc_to_field(loc: Iterable[Any]) -> str:
    """``("body", "spec", "damage", "fraction")`` → ``"spec.damage.fraction"``; the request part
    (body/query/path/header) is dropped and list indices become ``[i]``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    field = ""
    for part in parts:
        if isinstance(part, int):
            field += f"[{part}]"
        else:
            field += f".{part}" if field else str(part)
    return field or "body"


def validation_errors(errors: Iterable[dict[str, Any]]) -> list[FieldError]:
    """Pydantic error dicts → field errors."""
    return [FieldError(field=loc_to_field(err["loc"]), message=str(err["msg"])) for err in errors]


def _type_uri(problem: str | None) -> str:
    return f"{_PROBLEM_BASE}{problem}" if problem else "about:blank"


def problem_response(request: Request, error: ApiError) -> JSONResponse:
    body = Problem(
        type=_type_uri(error.problem),
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=request.url.path,
        errors=error.errors,
    ).model_dump(exclude_none=True)
    body.update(error.extra)
    return JSONResponse(
        body, status_code=error.status, headers=error.headers, media_type=PROBLEM_MEDIA_TYPE
    )


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name.removesuffix("Error")).lower()


def from_camres_error(exc: CamresError) -> ApiError:
    """A core error as a problem: input errors are 422 naming their field, others 500."""
    status = 422 if isinstance(exc, InputError) else 500
    errors = [FieldError(field=exc.field, message=exc.message)] if exc.field else None
    return ApiError(status, exc.message, problem=_kebab(type(exc).__name__), errors=errors)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(request, exc)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.url.path}"
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    # A streamed body cut off by service.limits arrives here; name it as the declared case does.
    # A 400 is a body the framework could not parse (e.g. broken multipart framing).
    problem = {413: "content-too-large", 400: "malformed-body"}.get(exc.status_code)
    return problem_response(
        request, ApiError(exc.status_code, detail, problem=problem, headers=headers)
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API documents at this path (Starlette's own Allow header names only
    the first route that matched the path)."""
    methods: set[str] = set()
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    # A literal path (/v1/datasets/register) is its own resource, not an instance of the
    # template it also matches (/v1/datasets/{dataset_id}).
    exact = paths.get(request.url.path)
    for template, operations in {request.url.path: exact}.items() if exact else paths.items():
        pattern, _, _ = compile_path(template)
        if pattern.match(request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


#: Request location → discriminator of the tagged union validated there. Pydantic puts the
#: chosen member's tag into error locations (``body.spec.cam.damage.fraction`` for a cam job);
#: it is not a field the client wrote, so it is dropped, and a missing or unknown tag is
#: reported on the discriminator field itself.
TaggedUnions = dict[tuple[str, ...], str]

_TAG_ERRORS = frozenset({"union_tag_not_found", "union_tag_invalid"})


def _untagged(error: dict[str, Any], tagged: TaggedUnions) -> dict[str, Any]:
    loc = list(error["loc"])
    for prefix, discriminator in tagged.items():
        n = len(prefix)
        if tuple(loc[:n]) != prefix:
            continue
        if len(loc) == n and error["type"] in _TAG_ERRORS:
            return {**error, "loc": (*loc, discriminator)}
        if len(loc) > n:
            return {**error, "loc": (*loc[:n], *loc[n + 1 :])}
    return error


def _request_validation(tagged: TaggedUnions) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        fields = validation_errors(_untagged(e, tagged) for e in exc.errors())
        return problem_response(
            request,
            ApiError(
                422,
                "; ".join(f"{f.field}: {f.message}" for f in fields),
                problem="validation-error",
                title="Request validation failed",
                errors=fields,
            ),
        )

    return handler


async def _camres_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CamresError)
    return problem_response(request, from_camres_error(exc))


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("job store unavailable: %s", exc)
    return problem_response(
        request, ApiError(503, f"the job store is unavailable: {exc}", problem="store-unavailable")
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        request, ApiError(500, "an unexpected error occurred", problem="internal-error")
    )


def install_problem_handlers(app: FastAPI, tagged_unions: TaggedUnions | None = None) -> None:
    """Route every error through :func:`problem_response`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _request_validation(tagged_unions or {}))
    app.add_exception_handler(CamresError, _camres_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem documents for ``statuses``."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
        for status in statuses
    }
