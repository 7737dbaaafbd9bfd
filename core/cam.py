"""Class activation maps: exact CAM (Eq. 1 of the paper, Zhou et al. 2016) and Grad-CAM.

Both methods share :class:`_CamMethod`, which runs one forward pass over a batch with the
feature layer hooked, picks the classes to explain, and leaves the model as it found it; a
method only says how to turn the hooked features into maps (:meth:`_CamMethod._maps`).

Maps come out *raw*, at the feature layer's resolution (7×7 for a 224 px ResNet); they are
brought to an image's size with :func:`upsample` and to [0, 1] with :func:`normalize`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine import autocast
from core.exceptions import (
    InputError,
    UnknownCamMethodError,
    UnknownClassError,
    UnsupportedModelError,
)
from core.hooks import capture_output, eval_mode, get_submodule
from core.registry import Registry

__all__ = [
    "CAM_METHODS",
    "FLAT_TOLERANCE",
    "Cam",
    "CamBatch",
    "GradCam",
    "compute_cams",
    "normalize",
    "resolve_classes",
    "select_targets",
    "upsample",
]

#: Relative range under which :func:`normalize` treats a map as constant (≈ 8 float32 ulp).
FLAT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class CamBatch:
    """What one batch pass produces; every tensor is detached and float32.

    ``targets[n, t]`` is the class index explained by ``maps[n, t]``: the same classes for every
    image when classes were named, each image's own top-k classes (best first) otherwise.
    """

    logits: Tensor  #: (N, C)
    probabilities: Tensor  #: (N, C) softmax of the logits
    targets: Tensor  #: (N, T) int64 class indices
    maps: Tensor  #: (N, T, h, w) raw maps at the feature layer's resolution


def resolve_classes(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Indices of the class ``names`` in the model's ``class_names``; an unknown one is an
    :class:`UnknownClassError` on ``classes``."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in names if name not in index]
    if unknown:
        known = ", ".join(class_names)
        raise UnknownClassError(
            f"unknown class {unknown[0]!r}; the model knows: {known}", field="classes"
        )
    return [index[name] for name in names]


def select_targets(logits: Tensor, *, classes: Sequence[int] | None, top_k: int) -> Tensor:
    """The (N, T) class indices to explain: ``classes`` for every image, or else each image's
    ``top_k`` best classes, best first (``top_k`` beyond the class count means every class)."""
    n, num_classes = logits.shape
    if classes is not None:
        if not classes:
            raise InputError("classes must name at least one class", field="classes")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UnknownClassError(
                f"class index {bad[0]} is outside 0..{num_classes - 1}", field="classes"
            )
        # Built on the host and copied without blocking: creating it on a CUDA device directly
        # would be a synchronizing copy inside the batch loop.
        chosen = torch.tensor(list(classes), dtype=torch.long)
        return chosen.to(logits.device, non_blocking=True).expand(n, -1)
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}", field="top_k")
    return logits.topk(min(top_k, num_classes), dim=1).indices


class _CamMethod(ABC):
    """A class activation map extractor, in the manner of torch-cam's ``_CAM``.

    ``feature_layer`` names the module whose output is f^k(x, y) (``layer4`` of a ResNet) and
    ``fc_layer`` the ``nn.Linear`` applied after global average pooling, when there is one.
    A call runs *one* forward pass over the whole batch in eval mode, with the feature layer
    hooked, and returns a :class:`CamBatch`. Hooks are removed and the train/eval flag of every
    submodule restored on the way out, also when the forward pass raises.
    """

    #: Whether the method differentiates the scores (and so cannot run in inference mode).
    needs_grad: ClassVar[bool] = False

    def __init__(self, model: nn.Module, feature_layer: str, fc_layer: str | None = None) -> None:
        self.model = model
        self.feature_layer = feature_layer
        self.fc_layer = fc_layer
        self._features = get_submodule(model, feature_layer, field="feature_layer")
        self._fc = None if fc_layer is None else get_submodule(model, fc_layer, field="fc_layer")

    def __call__(
        self,
        images: Tensor,
        *,
        classes: Sequence[int] | None = None,
        top_k: int = 1,
        precision: str = "fp32",
    ) -> CamBatch:
        """Explain a batch of preprocessed ``images`` (N×3×H×W) for the named class indices or
        each image's ``top_k`` classes. ``precision`` ``"bf16"`` or ``"fp16"`` runs the forward
        pass under autocast (:func:`core.engine.autocast_dtype`); the maps are computed from the
        features cast to float32 and returned in float32 either way.

        Nothing here waits for the device (no ``.item()``, no host copies): on CUDA a call only
        queues work, so the caller can prepare the next batch meanwhile."""
        if images.ndim != 4:
            raise InputError(
                f"expected a batch of shape N×C×H×W, got {tuple(images.shape)}", field="images"
            )
        with self._autograd_mode():
            if self.needs_grad and images.is_inference():
                images = images.clone()  # inference tensors cannot be saved for backward
            with (
                eval_mode(self.model),
                capture_output(self._features, as_leaf=self.needs_grad) as captured,
                autocast(precision, images.device),
            ):
                logits = self.model(images)
            features = captured.value
            if features.ndim != 4:
                raise UnsupportedModelError(
                    f"feature layer {self.feature_layer!r} gives shape {tuple(features.shape)},"
                    " not N×K×h×w",
                    field="feature_layer",
                )
            logits = logits.float()
            targets = select_targets(logits.detach(), classes=classes, top_k=top_k)
            maps = self._maps(features, logits, targets)
        # Cloned outside inference mode, so callers get ordinary tensors they may modify; the
        # copies are tiny (N×C logits, N×T×h×w maps).
        logits = logits.detach().clone()
        return CamBatch(
            logits=logits,
            probabilities=logits.softmax(dim=1),
            targets=targets.clone(),
            maps=maps.detach().float().clone(),
        )

    @contextlib.contextmanager
    def _autograd_mode(self) -> Iterator[None]:
        # Inference mode skips autograd bookkeeping altogether; a gradient method must leave
        # it (also when the caller is inside it) and switch grad on, for this call only.
        if not self.needs_grad:
            with torch.inference_mode():
                yield
        else:
            with torch.inference_mode(False), torch.enable_grad():
                yield

    @abstractmethod
    def _maps(self, features: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        """Raw (N, T, h, w) maps of the ``targets`` from the hooked ``features`` (N, K, h, w)
        and the ``logits`` (N, C) of the same forward pass."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(feature_layer={self.feature_layer!r})"


CAM_METHODS: Registry[type[_CamMethod]] = Registry(
    "CAM method", UnknownCamMethodError, field="method"
)


@CAM_METHODS.register("cam")
class Cam(_CamMethod):
    """Exact CAM, Eq. 1 of the paper (Zhou et al. 2016, ref. [15]):

        F_c(x, y) = Σ_k w_c^k f^k(x, y)

    with f the feature layer's output and w_c the row of the fc layer for class c. Because the
    head is GAP → fc, the logit is y_c = mean_(x,y) F_c(x, y) + b_c: the fc bias b_c is one
    constant per class, carries no spatial information and is left out of the map (it would
    vanish under min-max normalization anyway). No backward pass: the maps of all selected
    classes for the whole batch are one batched matrix product, in inference mode.
    """

    def __init__(self, model: nn.Module, feature_layer: str, fc_layer: str | None = None) -> None:
        if fc_layer is None:
            raise UnsupportedModelError(
                "exact CAM needs a global-average-pooling → fc head, which this network lacks;"
                " use Grad-CAM",
                field="method",
            )
        super().__init__(model, feature_layer, fc_layer)
        if not isinstance(self._fc, nn.Linear):
            raise UnsupportedModelError(
                f"{fc_layer!r} is a {type(self._fc).__name__}, not nn.Linear", field="fc_layer"
            )
        self._linear: nn.Linear = self._fc

    def _maps(self, features: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        # Read at every call: damage may swap or re-parametrize the weight between calls.
        weight = self._linear.weight
        if weight.shape != (logits.shape[1], features.shape[1]):
            raise UnsupportedModelError(
                f"fc weight {tuple(weight.shape)} does not map the {features.shape[1]} features"
                f" of {self.feature_layer!r} to the {logits.shape[1]} logits",
                field="fc_layer",
            )
        # Selecting the fc rows first keeps the cost at T (not C) maps per image.
        return torch.einsum("ntk,nkhw->nthw", weight[targets].float(), features.float())


@CAM_METHODS.register("gradcam")
class GradCam(_CamMethod):
    """Grad-CAM (Selvaraju et al., ref. [8]): channel weights are the spatially averaged
    gradients of the class score, α_c^k = 1/(h·w) Σ_(x,y) ∂y_c/∂f^k(x, y), and the map is
    ReLU(Σ_k α_c^k f^k(x, y)).

    Works on any network (no GAP → fc head needed). For a GAP → fc head on the last block,
    ∂y_c/∂f^k(x, y) = w_c^k/(h·w), so Grad-CAM = ReLU(CAM)/(h·w) exactly. Gradients are taken
    with ``torch.autograd.grad`` with respect to the hooked features only: parameters' ``.grad``
    stay untouched, and the graph is dropped when the call returns.
    """

    needs_grad = True

    def _maps(self, features: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        # Images are independent in eval mode, so one backward of the batch sum per target
        # column gives every image's gradient at once.
        scores = logits.gather(1, targets)
        fmaps = features.detach().float()
        maps = []
        last = scores.shape[1] - 1
        for t in range(scores.shape[1]):
            (grads,) = torch.autograd.grad(scores[:, t].sum(), features, retain_graph=t < last)
            alpha = grads.float().mean(dim=(2, 3))
            maps.append(torch.einsum("nk,nkhw->nhw", alpha, fmaps).relu())
        return torch.stack(maps, dim=1)


def compute_cams(
    model: nn.Module,
    images: Tensor,
    *,
    feature_layer: str,
    fc_layer: str | None,
    method: str = "cam",
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    precision: str = "fp32",
) -> CamBatch:
    """Run the CAM ``method`` registered in :data:`CAM_METHODS` over a preprocessed batch."""
    extractor = CAM_METHODS.get(method)(model, feature_layer, fc_layer)
    return extractor(images, classes=classes, top_k=top_k, precision=precision)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of maps (..., h, w) to ``size`` = (H, W)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def normalize(maps: Tensor, *, relu: bool = True) -> Tensor:
    """Per-map normalization to [0, 1] over the last two dimensions: optional ReLU (negative
    evidence counts as none), then min-max, (F − min F) / (max F − min F).

    A constant map becomes all zeros, never NaN. "Constant" allows for float32 rounding: a range
    below :data:`FLAT_TOLERANCE` of the map's magnitude is noise (bilinear upsampling of a
    constant map is only constant to a few ulp) and must not be stretched to [0, 1].
    """
    flat = maps.flatten(-2).float()
    if relu:
        flat = flat.clamp(min=0)
    low, high = torch.aminmax(flat, dim=-1, keepdim=True)
    span = high - low
    flat_map = span <= FLAT_TOLERANCE * torch.maximum(low.abs(), high.abs())
    # Few passes over the full-size maps: this runs per image at the original resolution.
    scaled = (flat - low).div_(span.masked_fill(flat_map, 1.0)).mul_((~flat_map).float())
    return scaled.reshape(maps.shape)
