"""FastAPI dependencies as ``Annotated`` aliases (the full-stack-fastapi-template way):
handlers declare ``store: StoreDep`` and get the app's job store, ``principal: PrincipalDep``
and get who is asking."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.auth import LOCAL, Principal
from service.catalog import DatasetCatalog, ModelCatalog
from service.metrics import GatewayMetrics
from service.problems import ApiError
from service.settings import Settings
from service.state import ServiceState
from service.store import JobStore
from service.watcher import JobWatcher


def get_state(request: Request) -> ServiceState:
    """The state of the app serving this request."""
    state: ServiceState = request.app.state.camres
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def _settings(state: StateDep) -> Settings:
    return state.settings


def _store(state: StateDep) -> JobStore:
    return state.store


def _models(state: StateDep) -> ModelCatalog:
    return state.models


def _datasets(state: StateDep) -> DatasetCatalog:
    return state.datasets


def _celery(state: StateDep) -> Celery:
    return state.celery


def _metrics(state: StateDep) -> GatewayMetrics:
    return state.metrics


def _watcher(state: StateDep) -> JobWatcher:
    return state.watcher


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
ModelsDep = Annotated[ModelCatalog, Depends(_models)]
DatasetsDep = Annotated[DatasetCatalog, Depends(_datasets)]
CeleryDep = Annotated[Celery, Depends(_celery)]
MetricsDep = Annotated[GatewayMetrics, Depends(_metrics)]
WatcherDep = Annotated[JobWatcher, Depends(_watcher)]


API_KEY_HEADER = "X-API-Key"

_api_key = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="ApiKey",
    auto_error=False,
    description="The client's API key (needed when the server has keys configured).",
)
_bearer = HTTPBearer(
    scheme_name="Bearer",
    auto_error=False,
    description=f"The same API key as `Authorization: Bearer <key>` (instead of {API_KEY_HEADER}).",
)


def _unauthorized(detail: str) -> ApiError:
    return ApiError(
        401,
        detail,
        problem="unauthorized",
        headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'},
    )


def get_principal(
    state: StateDep,
    api_key: Annotated[str | None, Security(_api_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Who is asking: the owner of the request's API key (401 without a known key), or
    :data:`service.auth.LOCAL` when the server has no keys configured."""
    if not state.keys.enabled:
        return LOCAL
    key = api_key or (bearer.credentials if bearer is not None else None)
    if not key:
        raise _unauthorized(f"an API key is required: send it in the {API_KEY_HEADER} header")
    principal = state.keys.authenticate(key)
    if principal is None:
        raise _unauthorized("the API key is not valid")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _require(request: Request, *accepted: str) -> None:
    media_type = _media_type(request)
    if media_type not in accepted:
        raise ApiError(
            415,
            f"expected {' or '.join(accepted)}, got {media_type or 'no content type'}",
            problem="unsupported-media-type",
        )


def require_multipart(request: Request) -> None:
    """415 unless the body is ``multipart/form-data`` (file uploads)."""
    _require(request, "multipart/form-data")


def require_form(request: Request) -> None:
    """415 unless the body is a form (multipart, or URL-encoded when it carries no file)."""
    _require(request, "multipart/form-data", "application/x-www-form-urlencoded")


def require_json(request: Request) -> None:
    """415 unless the body is ``application/json``."""
    _require(request, "application/json")
