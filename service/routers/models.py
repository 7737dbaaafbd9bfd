"""Models: upload camres checkpoints, list them (with the built-in ImageNet models), delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from core.exceptions import CheckpointError
from service.catalog import ModelInfo
from service.deps import ModelsDep, require_multipart
from service.problems import ApiError, field_error, from_camres_error, not_found, problem_responses
from service.schemas import ModelList
from service.uploads import save_upload

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=201,
    response_model=ModelInfo,
    dependencies=[Depends(require_multipart)],
    responses=problem_responses(413, 415, 422),
)
def create_model(
    file: Annotated[UploadFile, File(description="A camres .safetensors checkpoint.")],
    models: ModelsDep,
    response: Response,
) -> ModelInfo:
    """Upload a checkpoint; uploading the same bytes again returns the stored model."""
    tmp = models.new_tmp_path()
    try:
        if save_upload(file, tmp) == 0:
            raise field_error("file", "the uploaded file is empty")
        info, _ = models.add(tmp)
    except CheckpointError as exc:
        raise from_camres_error(CheckpointError(exc.message, field="file")) from exc
    finally:
        tmp.unlink(missing_ok=True)
    response.headers["Location"] = f"{router.prefix}/{info.id}"
    return info


@router.get("", response_model=ModelList)
def list_models(models: ModelsDep) -> ModelList:
    """Every model: built-ins first, then uploaded and produced models, oldest first."""
    return ModelList(items=models.list())


@router.get("/{model_id}", response_model=ModelInfo, responses=problem_responses(404))
def read_model(model_id: str, models: ModelsDep) -> ModelInfo:
    """One model by id."""
    info = models.get(model_id)
    if info is None:
        raise not_found("model", model_id)
    return info


@router.delete("/{model_id}", status_code=204, responses=problem_responses(404, 409))
def delete_model(model_id: str, models: ModelsDep) -> Response:
    """Delete a stored model (built-in models cannot be deleted)."""
    info = models.get(model_id)
    if info is None:
        raise not_found("model", model_id)
    if info.builtin:
        raise ApiError(409, f"{model_id!r} is a built-in model", problem="builtin-model")
    if not models.delete(model_id):
        raise not_found("model", model_id)
    return Response(status_code=204)
