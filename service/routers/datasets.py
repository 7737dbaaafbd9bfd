"""Datasets: zip uploads of class folders, registration of folders on the shared store."""

from __future__ import annotations

import uuid
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from service.catalog import ArchiveLimits, DatasetInfo
from service.deps import (
    DatasetsDep,
    PrincipalDep,
    SettingsDep,
    require_json,
    require_multipart,
)
from service.problems import ApiError, field_error, not_found, problem_responses
from service.schemas import DatasetList, DatasetRegistration
from service.uploads import client_name, save_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problem_responses(401))


@router.post(
    "",
    status_code=201,
    response_model=DatasetInfo,
    dependencies=[Depends(require_multipart)],
    responses=problem_responses(400, 413, 415, 422),
)
def create_dataset(
    file: Annotated[UploadFile, File(description="A zip of class folders: <class>/<image>.")],
    datasets: DatasetsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
    name: Annotated[str | None, Form(min_length=1, max_length=200)] = None,
) -> DatasetInfo:
    """Upload a dataset: at least two class folders, none empty, every file a readable image."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.tmp_dir / f"upload-{uuid.uuid4().hex}.zip"
    try:
        save_upload(file, tmp)
        if not zipfile.is_zipfile(tmp):
            raise ApiError(415, "the file is not a zip archive", problem="unsupported-media-type")
        limits = ArchiveLimits(
            max_files=settings.max_dataset_files,
            max_total_bytes=settings.max_dataset_uncompressed_bytes,
        )
        default_name = Path(client_name(file, "dataset.zip")).stem
        info = datasets.add_zip(
            tmp,
            name or default_name,
            limits,
            max_pixels=settings.max_image_pixels,
            owner=principal.owner,
        )
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"{router.prefix}/{info.id}"
    return info


@router.post(
    "/register",
    status_code=201,
    response_model=DatasetInfo,
    dependencies=[Depends(require_json)],
    responses=problem_responses(400, 403, 415, 422),
)
def register_dataset(
    body: DatasetRegistration,
    datasets: DatasetsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
) -> DatasetInfo:
    """Catalogue a folder already on the shared store for ``owner`` (default: the caller).
    Admin keys only; disabled unless configured."""
    if not settings.allow_dataset_register:
        raise ApiError(403, "dataset registration is disabled on this server", problem="forbidden")
    if not principal.admin:
        raise ApiError(403, "registering a dataset needs an admin key", problem="forbidden")
    owner = principal.owner if body.owner is None else body.owner
    folder = Path(body.path)
    if not folder.is_absolute():
        raise field_error("path", "must be an absolute path")
    resolved = folder.resolve()
    roots = [root.resolve() for root in settings.dataset_register_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise field_error("path", "is not under an allowed dataset root", status=403)
    if not resolved.is_dir():
        raise field_error("path", "is not a folder")
    info = datasets.register(resolved, body.name, max_pixels=settings.max_image_pixels, owner=owner)
    response.headers["Location"] = f"{router.prefix}/{info.id}"
    return info


@router.get("", response_model=DatasetList)
def list_datasets(datasets: DatasetsDep, principal: PrincipalDep) -> DatasetList:
    """Every dataset the caller may see, oldest first."""
    return DatasetList(items=datasets.list_for(principal))


@router.get("/{dataset_id}", response_model=DatasetInfo, responses=problem_responses(404))
def read_dataset(dataset_id: str, datasets: DatasetsDep, principal: PrincipalDep) -> DatasetInfo:
    """One dataset by id."""
    info = datasets.find(dataset_id, principal)
    if info is None:
        raise not_found("dataset", dataset_id)
    return info


@router.delete("/{dataset_id}", status_code=204, responses=problem_responses(404))
def delete_dataset(dataset_id: str, datasets: DatasetsDep, principal: PrincipalDep) -> Response:
    """Delete a dataset (a registered folder itself is left untouched)."""
    if datasets.find(dataset_id, principal) is None or not datasets.delete(dataset_id):
        raise not_found("dataset", dataset_id)
    return Response(status_code=204)
