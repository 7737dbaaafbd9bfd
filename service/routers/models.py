"""Models: upload camres checkpoints, list them (with the built-in ImageNet models), delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from core.exceptions import CheckpointError
from service.catalog import ModelInfo
from service.deps import ModelsDep, PrincipalDep, require_multipart
from service.problems import ApiError, field_error, from_camres_error, not_found, problem_responses
from service.schemas import ModelList
from service.uploads import save_upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problem_responses(401))


@router.post(
    "",
    status_code=201,
    response_model=ModelInfo,
    dependencies=[Depends(require_multipart)],
    responses=problem_responses(400, 413, 415, 422),
)
def create_model(
    file: Annotated[UploadFile, File(description="A camres .safetensors checkpoint.")],
    models: ModelsDep,
    principal: PrincipalDep,
    response: Response,
) -> ModelInfo:
    """Upload a checkpoint; uploading the same bytes again returns the stored model. Refused
    when it is not a camres safetensors checkpoint (pickles are never loaded) or its tensors
    contradict its metadata (architecture, number of classes)."""
    tmp = models.new_tmp_path()
    try:
        if save_upload(file, tmp) == 0:
            raise field_error("file", "the uploaded file is empty")
        info, _ = models.add(tmp, principal.owner)
    except CheckpointError as exc:
        raise from_camres_error(CheckpointError(exc.message, field="file")) from exc
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"{router.prefix}/{info.id}"
    return info


@router.get("", response_model=ModelList)
def list_models(models: ModelsDep, principal: PrincipalDep) -> ModelList:
    """Every model the caller may see: built-ins first, then uploaded and produced models,
    oldest first."""
    return ModelList(items=models.list_for(principal))


@router.get("/{model_id}", response_model=ModelInfo, responses=problem_responses(404))
def read_model(model_id: str, models: ModelsDep, principal: PrincipalDep) -> ModelInfo:
    """One model by id."""
    info = models.find(model_id, principal)
    if info is None:
        raise not_found("model", model_id)
    return info


@router.delete("/{model_id}", status_code=204, responses=problem_responses(404, 409))
def delete_model(model_id: str, models: ModelsDep, principal: PrincipalDep) -> Response:
    """Delete a stored model (built-in models cannot be deleted)."""
    info = models.find(model_id, principal)
    if info is None:
        raise not_found("model", model_id)
    if info.builtin:
        raise ApiError(409, f"{model_id!r} is a built-in model", problem="builtin-model")
    if not models.delete(model_id, info.owner):
        raise not_found("model", model_id)
    return Response(status_code=204)
